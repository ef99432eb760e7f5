"""Cancel many yamux writes half-way between two py-libp2p hosts, then check that their connection survived.

Run in its own process (py-libp2p and hivemind clash on protobuf symbols in one):
``python tests/libp2p_cancel_storm.py [--unpatched]`` prints ``{"writes": N, "connection_alive": bool, ...}``.
"""

from __future__ import annotations

import json
import random
import sys

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo

from p2ptrain.p2pd import libp2p_patches
from p2ptrain.p2pd.flags import Options
from p2ptrain.p2pd.host import build_host

PROTOCOL = "/p2ptrain-test/sink/1.0.0"
WRITES = 300
PAYLOAD = b"\x5a" * (1 << 20)


async def sink(stream) -> None:  # noqa: ANN001 - py-libp2p's INetStream
    try:
        while await stream.read(1 << 16):
            await trio.sleep(0)
    except Exception:  # noqa: BLE001 - the writer resets its streams on purpose
        pass


async def echo(stream) -> None:  # noqa: ANN001
    data = await stream.read(5)
    await stream.write(data)
    await stream.close()


async def storm() -> dict:
    options = Options(host_addrs=("/ip4/127.0.0.1/tcp/0",))
    a, b = (build_host(options, create_new_key_pair()) for _ in range(2))
    listen = [multiaddr.Multiaddr(addr) for addr in options.host_addrs]
    async with a.run(listen), b.run(listen):
        b.set_stream_handler(PROTOCOL, sink)
        b.set_stream_handler(PROTOCOL + "/echo", echo)
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        connection = a.get_network().get_connections(b.get_id())[0]
        rng = random.Random(0)
        done = 0
        error = ""
        try:
            with trio.move_on_after(60):
                while done < WRITES and not connection.is_closed:
                    stream = await a.new_stream(b.get_id(), [PROTOCOL])
                    with trio.move_on_after(rng.uniform(0.0005, 0.01)):  # cancels the write somewhere half-way
                        await stream.write(PAYLOAD)
                    await stream.reset()
                    done += 1
            await trio.sleep(0.5)  # a corrupted frame has reached b's decryption by now
            with trio.fail_after(10):
                stream = await a.new_stream(b.get_id(), [PROTOCOL + "/echo"])
                await stream.write(b"hello")
                answer = await stream.read(5)
        except Exception as e:  # noqa: BLE001 - what a broken connection raises varies
            error, answer = f"{type(e).__name__}: {e}", b""
        alive = not connection.is_closed and answer == b"hello"
        return {"writes": done, "connection_alive": alive, "error": error[:200]}


def main() -> None:
    if "--unpatched" not in sys.argv:
        libp2p_patches.install()
    print(json.dumps(trio.run(storm)))


if __name__ == "__main__":
    main()
