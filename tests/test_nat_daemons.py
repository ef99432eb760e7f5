"""The libp2p daemons on a small internet of network namespaces (scripts/netlab.py): what they advertise, and how
peers behind NAT routers reach each other (relays, hole punching). Real daemons, driven through hivemind's client
from this process; each runs in the namespace of its host (``Host.wrap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import hivemind.p2p.p2p_daemon as p2p_daemon
import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import test_pb2

from p2ptrain import p2p_stack

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from netlab import Host, NatLab, missing_tools  # noqa: E402

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} for a NAT lab")
TIMEOUT_S = 90


@pytest.fixture
def lab():
    lab = NatLab()
    try:
        yield lab
    finally:
        lab.remove()


async def start_on(host: Host, kind: str, stack: AsyncExitStack, workdir: Path, **kwargs) -> P2P:
    """A daemon of ``kind`` on ``host``, with hivemind's client in this process (unix sockets cross namespaces)."""
    wrapper = host.wrap(p2p_stack.binary(kind), workdir)

    @contextlib.contextmanager
    def on_host(_package, _name):
        yield wrapper

    before, p2p_daemon.path = p2p_daemon.path, on_host
    try:
        p2p = await P2P.create(**kwargs)
    finally:
        p2p_daemon.path = before
    stack.push_async_callback(p2p.shutdown)
    return p2p


async def double(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
    return test_pb2.TestResponse(number=2 * request.number)


@pytest.mark.parametrize("kind", ["py", "go"])
def test_a_daemon_listening_on_all_interfaces_is_dialable_at_what_it_advertises(lab, tmp_path, kind):
    """x listens on 0.0.0.0 (what a peer does when --host is not given); z knows only y, and finds x's addresses
    through the Kademlia DHT, i.e. as x advertised them through identify. An advertised 0.0.0.0 would make z
    dial its own machine."""
    x_host, y_host, z_host = lab.public("x"), lab.public("y"), lab.public("z")

    async def scenario() -> None:
        async with AsyncExitStack() as stack:
            x = await start_on(x_host, kind, stack, tmp_path, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
            advertised = [str(a) for a in await x.get_visible_maddrs()]
            assert not any("/ip4/0.0.0.0/" in a for a in advertised), advertised
            assert any(f"/ip4/{x_host.ip}/tcp/" in a for a in advertised), advertised
            await x.add_protobuf_handler("double", double, test_pb2.TestRequest)
            x_at = [a for a in await x.get_visible_maddrs() if x_host.ip in str(a)]
            y = await start_on(y_host, "py", stack, tmp_path, initial_peers=x_at, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
            y_at = [a for a in await y.get_visible_maddrs() if y_host.ip in str(a)]
            z = await start_on(z_host, "py", stack, tmp_path, initial_peers=y_at, host_maddrs=["/ip4/0.0.0.0/tcp/0"])
            reply = await z.call_protobuf_handler(
                x.peer_id, "double", test_pb2.TestRequest(number=21), test_pb2.TestResponse
            )
            assert reply.number == 42
            (info,) = [p for p in await z.list_peers() if p.peer_id == x.peer_id]
            assert any(x_host.ip in str(a) for a in info.addrs), info.addrs

    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S))
