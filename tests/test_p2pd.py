"""p2ptrain-p2pd driven through hivemind's own client (``hivemind.p2p.P2P``), as hivemind drives its Go daemon.

Every test starts real daemon processes on 127.0.0.1. The mixed tests put the Go daemon hivemind bundles and
ours in one swarm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import hivemind
import hivemind.p2p.p2p_daemon as p2p_daemon
import numpy as np
import psutil
import pytest
import torch
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, P2PHandlerError
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.proto import runtime_pb2, test_pb2
from multiaddr import Multiaddr

from p2ptrain.p2pd.flags import FlagError, parse, parse_duration
from p2ptrain.swarm import p2p_stack

TIMEOUT_S = 60


def local_ipv4s() -> list[str]:
    return sorted({a.address for nics in psutil.net_if_addrs().values() for a in nics if a.family.name == "AF_INET"})


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def start(kind: str, stack: AsyncExitStack, **kwargs) -> P2P:
    with p2p_stack.selected(kind):
        p2p = await P2P.create(**kwargs)
    stack.push_async_callback(p2p.shutdown)
    return p2p


async def pair(stack: AsyncExitStack, kinds=("py", "py")) -> tuple[P2P, P2P]:
    a = await start(kinds[0], stack)
    b = await start(kinds[1], stack, initial_peers=await a.get_visible_maddrs())
    return a, b


async def double(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=2 * request.number)


def test_flags_hivemind_passes_are_accepted():
    args = P2P._make_process_args(
        "p2pd",
        autoRelay=False,
        autonat=True,
        b=True,
        connManager=True,
        idleTimeout="30s",
        listen="/unix/tmp/hivemind-p2pd-x.sock",
        natPortMap=True,
        relay=True,
        relayHopLimit=0,
        tls=True,
        persistentConnMaxMsgSize=4194304,
        dhtServer=1,
        bootstrapPeers="/ip4/127.0.0.1/tcp/1/p2p/QmX,/ip4/127.0.0.1/tcp/2/p2p/QmY",
        hostAddrs="/ip4/127.0.0.1/tcp/0",
        forceReachabilityPublic=1,
        id="/tmp/key",
    )[1:]
    options = parse(args)
    assert options.control == "/unix/tmp/hivemind-p2pd-x.sock"
    assert options.bootstrap and options.dht_server and options.idle_timeout_s == 30
    assert options.bootstrap_peers == ("/ip4/127.0.0.1/tcp/1/p2p/QmX", "/ip4/127.0.0.1/tcp/2/p2p/QmY")
    assert options.host_addrs == ("/ip4/127.0.0.1/tcp/0",) and options.identity == "/tmp/key"
    assert parse_duration("1m30s") == 90 and parse_duration("500ms") == 0.5
    for bad in (["-nosuchflag=1"], ["-idleTimeout=soon"], ["listen"], ["-listen=/ip4/1.2.3.4/tcp/1"], ["-b=maybe"]):
        with pytest.raises(FlagError):
            parse(bad)


def test_advertised_addresses_expand_all_interfaces_and_leave_loopback_out():
    """A host listening on 0.0.0.0 advertises its interfaces' addresses, never 0.0.0.0, and 127.0.0.1 only when it
    has nothing else (another machine that dials 127.0.0.1 reaches itself); behind NAT, not the router's address
    that peers observed it at (nobody can dial it), but its circuit addresses. In a process of its own, as the
    daemon runs: py-libp2p's protobufs and hivemind's cannot be loaded into one."""
    circuit = "/ip4/11.77.0.4/tcp/31337/p2p/12D3KooWJbhkGmLBoyQgG9un43J89dT3n9U2WBhHLLr86HB7t1Nv/p2p-circuit"
    code = (
        "import json, multiaddr; from p2ptrain.p2pd.flags import parse; from p2ptrain.p2pd.host import advertised\n"
        "m = lambda *texts: [multiaddr.Multiaddr(t) for t in texts]\n"
        "f = advertised(parse([]), [])\n"
        "both = f(m('/ip4/0.0.0.0/tcp/31337', '/ip4/127.0.0.1/tcp/4001'))\n"
        "alone = f(m('/ip4/127.0.0.1/tcp/4001'))\n"
        "seen = m('/ip4/0.0.0.0/tcp/31337', '/ip4/11.77.0.5/tcp/31337')\n"
        f"private = advertised(parse(['-forceReachabilityPrivate']), m('{circuit}'))(seen)\n"
        "print(json.dumps([[str(a) for a in x] for x in (both, alone, f(seen), private)]))"
    )
    both, alone, public, private = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    others = [ip for ip in local_ipv4s() if not ip.startswith("127.")]
    loopback = ["/ip4/127.0.0.1/tcp/31337", "/ip4/127.0.0.1/tcp/4001"]
    assert both == ([f"/ip4/{ip}/tcp/31337" for ip in others] if others else loopback)
    assert alone == ["/ip4/127.0.0.1/tcp/4001"]  # --host 127.0.0.1: all it has
    assert "/ip4/11.77.0.5/tcp/31337" in public  # observed, and it may be dialable (a peer's reach check tells)
    assert "/ip4/11.77.0.5/tcp/31337" not in private and circuit in private, private


def test_unknown_flag_exits_with_go_message(tmp_path):
    out = subprocess.run(
        [str(p2p_stack.python_daemon()), "-bogus=1"], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 2 and "flag provided but not defined: -bogus" in out.stderr


def test_unreachable_bootstrap_peers_fail_the_start_as_go_does():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWJbhkGmLBoyQgG9un43J89dT3n9U2WBhHLLr86HB7t1Nv"

    async def main():
        with pytest.raises(P2PDaemonError, match="failed to connect to bootstrap peers"):
            await start("py", AsyncExitStack(), initial_peers=[dead])

    run(main())


def test_identity_file_gives_hivemind_peer_id(tmp_path):
    key = tmp_path / "p2p.key"
    P2P.generate_identity(str(key))  # RSA, as hivemind writes it

    async def main():
        async with AsyncExitStack() as stack:
            p2p = await start("py", stack, identity_path=str(key))
            assert p2p.peer_id == PeerID.from_identity(key.read_bytes())
            addrs = await p2p.get_visible_maddrs()
            assert addrs and all(str(a).endswith(f"/p2p/{p2p.peer_id}") for a in addrs)

    run(main())


def test_signed_peer_records_carry_the_rsa_key_type(tmp_path):
    """A Python daemon's peer record (sent in every identify) names its key's type even for RSA, whose type is 0 and
    which py-libp2p's proto3 message leaves out; without it a Go daemon refuses the record and logs an ERROR at each
    identify (libp2p_patches.envelope_key_type_sent). hivemind logs what its daemon prints."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    async def main():
        async with AsyncExitStack() as stack:
            key_file = tmp_path / "rsa.key"
            P2P.generate_identity(str(key_file))
            py = await start("py", stack, identity_path=str(key_file))
            go = await start("go", stack, initial_peers=await py.get_visible_maddrs())
            await py.add_protobuf_handler("double", double, test_pb2.TestRequest)
            request = test_pb2.TestRequest(number=2)
            assert (await go.call_protobuf_handler(py.peer_id, "double", request, test_pb2.TestResponse)).number == 4
            await asyncio.sleep(2.0)  # identify and its push

    daemon_log = logging.getLogger(p2p_daemon.__name__)
    handler = Keep(logging.ERROR)
    daemon_log.addHandler(handler)
    try:
        run(main())
    finally:
        daemon_log.removeHandler(handler)
    assert not [line for line in seen if "peer record" in line], seen


@pytest.mark.parametrize("kinds", [("py", "py"), ("py", "go"), ("go", "py")])
def test_unary_calls_both_ways_and_errors(kinds):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, kinds)

            async def fail(request, context):
                raise ValueError(f"no {request.number}")

            async def who(request, context):
                return test_pb2.TestResponse(number=int(context.remote_id == b.peer_id))

            await a.add_protobuf_handler("double", double, test_pb2.TestRequest)
            await a.add_protobuf_handler("fail", fail, test_pb2.TestRequest)
            await a.add_protobuf_handler("who", who, test_pb2.TestRequest)
            await b.add_protobuf_handler("double", double, test_pb2.TestRequest)
            out = await b.call_protobuf_handler(
                a.peer_id, "double", test_pb2.TestRequest(number=21), test_pb2.TestResponse
            )
            assert out.number == 42
            back = await a.call_protobuf_handler(
                b.peer_id, "double", test_pb2.TestRequest(number=5), test_pb2.TestResponse
            )
            assert back.number == 10
            # the callee's daemon tells the handler who really called
            assert (
                await b.call_protobuf_handler(a.peer_id, "who", test_pb2.TestRequest(), test_pb2.TestResponse)
            ).number
            with pytest.raises(P2PHandlerError, match="no 7"):
                await b.call_protobuf_handler(a.peer_id, "fail", test_pb2.TestRequest(number=7), test_pb2.TestResponse)
            with pytest.raises(P2PDaemonError):
                await b.call_protobuf_handler(a.peer_id, "absent", test_pb2.TestRequest(), test_pb2.TestResponse)
            with pytest.raises(P2PDaemonError, match="already"):
                await a.add_protobuf_handler("double", double, test_pb2.TestRequest)

    run(main())


@pytest.mark.parametrize("kinds", [("py", "py"), ("go", "py")])
def test_streaming_calls_large_messages(kinds):
    chunk = 1024 * 1024

    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, kinds)

            async def echo_sizes(requests, context):
                async for request in requests:
                    yield runtime_pb2.Tensor(buffer=request.buffer[::-1][:16], size=[len(request.buffer)])

            async def blobs(request, context):
                for i in range(request.number):
                    yield runtime_pb2.Tensor(buffer=bytes([i % 256]) * chunk)

            for p2p in (a, b):
                await p2p.add_protobuf_handler(
                    "sizes", echo_sizes, runtime_pb2.Tensor, stream_input=True, stream_output=True
                )
                await p2p.add_protobuf_handler("blobs", blobs, test_pb2.TestRequest, stream_output=True)

            async def payloads():
                for i in range(12):
                    yield runtime_pb2.Tensor(buffer=os.urandom(chunk + i))

            for caller, callee in ((b, a), (a, b)):
                sizes = [
                    r.size[0]
                    async for r in await caller.iterate_protobuf_handler(
                        callee.peer_id, "sizes", payloads(), runtime_pb2.Tensor
                    )
                ]
                assert sizes == [chunk + i for i in range(12)]
                got = [
                    r
                    async for r in await caller.iterate_protobuf_handler(
                        callee.peer_id, "blobs", test_pb2.TestRequest(number=24), runtime_pb2.Tensor
                    )
                ]
                assert [len(r.buffer) for r in got] == [chunk] * 24 and got[5].buffer[:1] == b"\x05"
            # a unary payload just under hivemind's 2 MiB unary limit
            big = os.urandom(2 * 1024 * 1024 - 1024)

            async def length(request, context):
                return test_pb2.TestResponse(number=len(request.buffer))

            await a.add_protobuf_handler("length", length, runtime_pb2.Tensor)
            out = await b.call_protobuf_handler(
                a.peer_id, "length", runtime_pb2.Tensor(buffer=big), test_pb2.TestResponse
            )
            assert out.number == len(big)

    run(main())


def test_stream_handler_error_reaches_the_caller():
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack)

            async def broken(requests, context):
                async for request in requests:
                    if request.number == 3:
                        raise RuntimeError("three is too many")
                    yield test_pb2.TestResponse(number=request.number)

            await a.add_protobuf_handler("broken", broken, test_pb2.TestRequest, stream_input=True, stream_output=True)

            # each request waits for the answer to the last: a handler that closes its socket with requests unread
            # resets the stream, and its error may be lost with it (the Go daemon's semantics, and ours)
            answered = asyncio.Queue()

            async def numbers():
                for i in range(5):
                    yield test_pb2.TestRequest(number=i)
                    await answered.get()

            seen = []
            with pytest.raises(P2PHandlerError, match="three is too many"):
                async for r in await b.iterate_protobuf_handler(a.peer_id, "broken", numbers(), test_pb2.TestResponse):
                    seen.append(r.number)
                    answered.put_nowait(r.number)
            assert seen == [0, 1, 2]

    run(main())


def test_many_concurrent_calls_and_cancellation():
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack)
            started, cancelled = asyncio.Event(), asyncio.Event()

            async def slow(request, context):
                started.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
                return test_pb2.TestResponse()

            await a.add_protobuf_handler("double", double, test_pb2.TestRequest)
            await a.add_protobuf_handler("slow", slow, test_pb2.TestRequest)
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(
                    b.call_protobuf_handler(a.peer_id, "double", test_pb2.TestRequest(number=i), test_pb2.TestResponse)
                    for i in range(300)
                )
            )
            assert [r.number for r in results] == [2 * i for i in range(300)]
            assert time.perf_counter() - t0 < 30

            call = asyncio.create_task(
                b.call_protobuf_handler(a.peer_id, "slow", test_pb2.TestRequest(), test_pb2.TestResponse)
            )
            await asyncio.wait_for(started.wait(), 10)
            call.cancel()
            # the caller's cancel travels: caller's daemon → reset stream → callee's daemon → cancel to the handler
            await asyncio.wait_for(cancelled.wait(), 10)
            # and the daemons still serve calls afterwards
            out = await b.call_protobuf_handler(
                a.peer_id, "double", test_pb2.TestRequest(number=4), test_pb2.TestResponse
            )
            assert out.number == 8

    run(main())


def test_handler_removal_and_client_disconnect():
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack)
            await a.add_protobuf_handler("double", double, test_pb2.TestRequest)
            await a.remove_protobuf_handler("double")
            with pytest.raises(P2PDaemonError):
                await b.call_protobuf_handler(
                    a.peer_id, "double", test_pb2.TestRequest(number=1), test_pb2.TestResponse
                )

            # a second client of a's daemon (hivemind's averager processes do this) shares a balanced handler
            replica = await P2P.replicate(a.daemon_listen_maddr)
            calls = {"main": 0, "replica": 0}

            def counting(name):
                async def handler(request, context):
                    calls[name] += 1
                    return test_pb2.TestResponse(number=request.number)

                return handler

            await a.add_protobuf_handler("count", counting("main"), test_pb2.TestRequest, balanced=True)
            await replica.add_protobuf_handler("count", counting("replica"), test_pb2.TestRequest, balanced=True)

            async def blob(request, context):
                yield test_pb2.TestResponse(number=request.number)

            await replica.add_protobuf_handler("blob", blob, test_pb2.TestRequest, stream_output=True)
            for i in range(10):
                await b.call_protobuf_handler(a.peer_id, "count", test_pb2.TestRequest(number=i), test_pb2.TestResponse)
            assert calls == {"main": 5, "replica": 5}

            await replica.shutdown()  # the replica's client disconnects: the daemon forgets its handlers
            for i in range(4):
                await b.call_protobuf_handler(a.peer_id, "count", test_pb2.TestRequest(number=i), test_pb2.TestResponse)
            assert calls == {"main": 9, "replica": 5}
            # its stream handler's socket is gone: the first stream is reset (the caller's socket is closed under
            # it, no answer), and the daemon forgets the handler, so the next one is refused outright
            request = test_pb2.TestRequest(number=1)
            try:
                got = [
                    r async for r in await b.iterate_protobuf_handler(a.peer_id, "blob", request, test_pb2.TestResponse)
                ]
                assert got == []
            except ConnectionError:
                pass
            with pytest.raises(P2PDaemonError):
                await b.iterate_protobuf_handler(a.peer_id, "blob", request, test_pb2.TestResponse)

    run(main())


def test_daemon_exits_when_its_last_client_leaves_or_none_comes(tmp_path):
    async def main():
        p2p = await start("py", AsyncExitStack())
        pid = p2p._child.pid
        await p2p.shutdown()  # SIGTERM
        return pid

    pid = run(main())
    assert wait_gone(pid, 10)

    sock = tmp_path / "c.sock"
    daemon = subprocess.Popen([str(p2p_stack.python_daemon()), f"-listen=/unix{sock}", "-idleTimeout=1s"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert daemon.stdout.readline().startswith("Control socket:")
        assert daemon.wait(timeout=20) == 0  # nobody connected within 1 s
        assert not sock.exists()
    finally:
        daemon.kill()


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def _dht_swarm(kinds: list[str]) -> list[hivemind.DHT]:
    dhts: list[hivemind.DHT] = []
    for kind in kinds:
        with p2p_stack.selected(kind):
            initial = dhts[0].get_visible_maddrs() if dhts else None
            dhts.append(hivemind.DHT(start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    return dhts


@pytest.mark.parametrize("kinds", [("py", "py"), ("py", "go")])
def test_handler_that_speaks_first_and_a_reader_that_pauses(kinds):
    """Bytes that arrive with the protocol's acceptance reach the caller (the negotiation is pipelined), and a
    writer out of yamux credit waits for a reader that pauses longer than py-libp2p's own 5 s limit."""
    size = 3 * 1024 * 1024

    async def main():
        async with AsyncExitStack() as stack:
            caller, callee = await pair(stack, kinds)

            async def greet(info, reader, writer):
                writer.write(b"hello")  # before the caller has sent anything
                await writer.drain()
                writer.close()

            received = asyncio.get_running_loop().create_future()

            async def pause_then_read(info, reader, writer):
                await asyncio.sleep(6)
                data = await reader.readexactly(size)
                received.set_result(len(data))
                writer.write(b"ok")
                await writer.drain()
                writer.close()

            await callee.add_binary_stream_handler("greet", greet)
            await callee.add_binary_stream_handler("slow", pause_then_read)

            _, reader, writer = await caller.call_binary_stream_handler(callee.peer_id, "greet")
            assert await reader.read() == b"hello"
            writer.close()

            _, reader, writer = await caller.call_binary_stream_handler(callee.peer_id, "slow")
            writer.write(os.urandom(size))
            await writer.drain()
            assert await asyncio.wait_for(received, 30) == size
            assert await reader.read() == b"ok"
            writer.close()

    run(main())


def test_calls_reach_a_peer_again_after_a_disconnect_or_a_restart(tmp_path):
    """A dead connection is dialled again, not reused: a volunteer's peer restarts with its identity and port."""
    identity = str(tmp_path / "identity.key")
    ask = test_pb2.TestRequest(number=4)

    async def main():
        async with AsyncExitStack() as stack:
            a = await start("py", stack)
            await a.add_protobuf_handler("double", double, test_pb2.TestRequest)
            with p2p_stack.selected("py"):
                b = await P2P.create(identity_path=identity, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            port = (await b.get_visible_maddrs())[0]["tcp"]
            await b.add_protobuf_handler("double", double, test_pb2.TestRequest)
            await a._client.connect(b.peer_id, await b.get_visible_maddrs())
            assert (await b.call_protobuf_handler(a.peer_id, "double", ask, test_pb2.TestResponse)).number == 8
            # b is told a's listening address, as a hivemind peer is by the DHT, rather than relying on the identify
            # that a's dial started having finished before the disconnect below
            await b._client.connect(a.peer_id, await a.get_visible_maddrs())
            await b._client.disconnect(a.peer_id)
            assert (await b.call_protobuf_handler(a.peer_id, "double", ask, test_pb2.TestResponse)).number == 8

            await b.shutdown()  # and back, as the same peer on the same port
            with p2p_stack.selected("py"):
                b = await P2P.create(identity_path=identity, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"])
            stack.push_async_callback(b.shutdown)
            await b.add_protobuf_handler("double", double, test_pb2.TestRequest)
            assert (await a.call_protobuf_handler(b.peer_id, "double", ask, test_pb2.TestResponse)).number == 8

    run(main())


def test_an_unspecified_address_is_never_dialled():
    """``/ip4/0.0.0.0`` names the advertiser's own machine, and a dial to it reaches the dialler's: here it would
    find b, listening on every interface of this machine, but the daemon refuses the address and takes the next."""
    ask = test_pb2.TestRequest(number=4)

    async def main():
        async with AsyncExitStack() as stack:
            a = await start("py", stack)
            b = await start("py", stack, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
            await b.add_protobuf_handler("double", double, test_pb2.TestRequest)
            port = (await b.get_visible_maddrs())[0]["tcp"]
            unspecified = Multiaddr(f"/ip4/0.0.0.0/tcp/{port}")
            with pytest.raises(ControlFailure, match="blocked by connection gate"):
                await a._client.connect(b.peer_id, [unspecified])
            await a._client.connect(b.peer_id, [unspecified, Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")])
            assert (await a.call_protobuf_handler(b.peer_id, "double", ask, test_pb2.TestResponse)).number == 8

    run(main())


def test_a_peer_is_reached_at_its_second_address_when_the_first_does_not_answer():
    """A peer behind a router that maps its port lists its LAN address first and the mapped one after it: py-libp2p
    0.8.1 dials only the first address of each transport, so callers outside that LAN never reached it. The daemon
    dials every direct address (``host._dial_direct``); here the first is a closed port on this machine."""
    ask = test_pb2.TestRequest(number=4)
    with socket.socket() as closed:  # a port nobody listens on once this socket is gone
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]

    async def main():
        async with AsyncExitStack() as stack:
            a = await start("py", stack)
            b = await start("py", stack)
            await b.add_protobuf_handler("double", double, test_pb2.TestRequest)
            port = (await b.get_visible_maddrs())[0]["tcp"]
            first, second = Multiaddr(f"/ip4/127.0.0.1/tcp/{dead}"), Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
            await a._client.connect(b.peer_id, [first, second])
            assert (await a.call_protobuf_handler(b.peer_id, "double", ask, test_pb2.TestResponse)).number == 8

    run(main())


def test_cancelled_writes_leave_the_connection_intact():
    """py-libp2p 0.8.1 loses a Noise nonce when a frame write is cancelled, which kills the connection
    (libp2p_patches.atomic_frame_writes). When the unpatched run stops breaking, py-libp2p has fixed it."""
    script = os.path.join(os.path.dirname(__file__), "libp2p_cancel_storm.py")

    def storm(*args: str) -> dict:
        out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    patched = storm()
    assert patched["connection_alive"] and patched["writes"] == 300, patched
    unpatched = storm("--unpatched")
    assert not unpatched["connection_alive"], unpatched


@pytest.mark.slow(alone=False)  # daemons and DHT nodes, no training: under one core
@pytest.mark.parametrize("kinds", [["py"] * 5, ["go", "py", "go", "py", "py"]], ids=["py", "mixed"])
def test_dht_store_get_across_five_nodes(kinds):
    dhts = _dht_swarm(kinds)
    try:
        expiration = hivemind.utils.get_dht_time() + 120
        for i, dht in enumerate(dhts):
            assert dht.store(f"key{i}", f"value{i}", expiration)
        for dht in dhts:
            for i in range(len(dhts)):
                found = dht.get(f"key{i}", latest=True)
                assert found is not None and found.value == f"value{i}", (kinds, i)
    finally:
        for dht in dhts:
            dht.shutdown()


@pytest.mark.slow(alone=False)  # four averagers on a small vector, no training
@pytest.mark.parametrize("kinds", [["py"] * 4, ["go", "py", "go", "py"]], ids=["py", "mixed"])
def test_decentralized_averager_allreduce_four_peers(kinds):
    dhts = _dht_swarm(kinds)
    rng = np.random.default_rng(0)
    tensors = [[torch.from_numpy(rng.standard_normal((1000, 64)).astype(np.float32))] for _ in kinds]
    expected = torch.stack([t[0] for t in tensors]).mean(0)
    averagers = []
    try:
        for dht, local in zip(dhts, tensors, strict=True):
            averagers.append(
                hivemind.averaging.DecentralizedAverager(
                    local,
                    dht,
                    prefix="p2pd-test",
                    target_group_size=len(kinds),
                    min_matchmaking_time=5.0,
                    request_timeout=10.0,
                    start=True,
                )  # fmt: skip
            )
        # on a loaded machine a round may gather only some of the peers; averaging within any group keeps the
        # mean over all four, so a later round with everyone still has to land exactly on it (≤ 3 rounds)
        for _ in range(3):
            futures = [a.step(wait=False, timeout=60) for a in averagers]
            groups = [f.result(timeout=150) for f in futures]
            if all(g is not None and len(g) == len(kinds) for g in groups):
                break
        assert all(g is not None and len(g) == len(kinds) for g in groups), [len(g or ()) for g in groups]
        for averager in averagers:
            with averager.get_tensors() as (tensor,):
                assert torch.allclose(tensor, expected, atol=1e-5)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_daemon_runs_as_module():
    out = subprocess.run(
        [sys.executable, "-m", "p2ptrain.p2pd", "-nope"], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 2
