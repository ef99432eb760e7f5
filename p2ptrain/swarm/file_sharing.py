"""A joiner's first run needs nothing by hand: the files its manifest pins (``pinned_files``) come from the Hugging
Face hub, at the commit they were pinned from, or from the swarm's peers, each of which serves the pinned files it
holds. Every file is checked against the manifest's SHA-256 and size before it is written where the loaders read it.

Between peers (``PROTOCOL``, a libp2p stream): the asker sends the file's SHA-256 (32 bytes) and then reads one
status byte — 1: the file follows, exactly its pinned size; 0: not served here; 2: busy, ask another peer. A peer
serves only files its manifest pins, ``MAX_TRANSFERS`` at once and ``PER_MINUTE`` requests per asker.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import hivemind
from huggingface_hub import hf_hub_url

from p2ptrain.errors import DatasetError
from p2ptrain.swarm.manifest import SwarmManifest
from p2ptrain.swarm.pinned_files import ALLOWED, Pinned, find, pinned, source

logger = logging.getLogger(__name__)
PROTOCOL = "/p2ptrain/files/1"
CHUNK = 1 << 20
MAX_TRANSFERS = 4  # files a peer sends at once
PER_MINUTE = 32  # requests a peer answers per asker
PEERS_ASKED = 8  # peers asked for one file, at most
MIN_RATE = 100_000  # bytes/s: a transfer slower than this is given up (and the next peer asked)
HUB_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1.0  # before asking the peers a second time for a file none of them gave
SERVED, NOT_HERE, BUSY = b"\x01", b"\x00", b"\x02"


def provide(
    dht: hivemind.DHT, manifest: SwarmManifest, data_dir: Path, stop: threading.Event | None = None
) -> dict[str, str]:
    """Make every file the manifest pins present here, fetching what is missing (the hub first, then peers), and
    serve them to the swarm's other peers. Returns what each kind loads from: the directory with its files, or
    the manifest's own name where it pins none. ``stop`` set: returns within a second, the fetch left unfinished
    (the caller checks ``stop``; what was fetched is kept).

    Raises:
        DatasetError: a pinned file could be fetched from neither the hub nor any peer.
    """
    where, serving = {}, {}
    for kind in ALLOWED:
        directory, missing = find(manifest, kind, data_dir)
        if directory is None:
            where[kind] = source(manifest, kind)
            continue
        if missing:
            try:
                fetch(dht, manifest, kind, directory, missing, stop or threading.Event())
            except Stopped:
                logger.info("Stopped while fetching the swarm's %s", kind.replace("_", " "))
                return where
        where[kind] = str(directory)
        serving.update({f.sha256: str(directory / f.name) for f in pinned(manifest, kind)})
    if serving:
        serve(dht, serving)
    return where


def serve(dht: hivemind.DHT, paths: dict[bytes, str]) -> None:
    """Answer peers' requests for the files ``paths`` maps by SHA-256 (pinned files, checked by the caller)."""
    dht.run_coroutine(functools.partial(_serve_files, paths=paths))


class Stopped(Exception):
    """The peer was asked to stop during a fetch."""


def fetch(
    dht: hivemind.DHT, manifest: SwarmManifest, kind: str, directory: Path, files: list[Pinned], stop: threading.Event
) -> None:
    total = sum(f.size for f in files)
    logger.info("Fetching the swarm's %s: %d file(s), %s", kind.replace("_", " "), len(files), _size(total))
    directory.mkdir(parents=True, exist_ok=True)
    hub_failed = fetch_from_hub(source(manifest, kind), files, directory, stop)
    missing = [f for f in files if f.name in hub_failed]
    if not missing:
        return
    wants = [(f.sha256, f.size, f.name, str(directory)) for f in missing]
    asked = dht.run_coroutine(functools.partial(_fetch_from_peers, wants=wants), return_future=True)
    while not asked.done():
        if stop.wait(0.5):
            asked.cancel()
            raise Stopped
    served, refused = asked.result()
    took = dict(served)
    for name, peer, why in refused:
        logger.warning("Refused %s from peer %s: %s", name, peer, why)
    for file in missing:
        if file.sha256 in took:
            logger.info("Took %s (%s) from peer %s: it matches the manifest", file.name, kind, took[file.sha256])
    left = [f for f in missing if f.sha256 not in took]
    if left:
        names = ", ".join(f"{f.name} (sha256 {f.sha256.hex()[:12]}…)" for f in left)
        why = "; ".join(sorted({hub_failed[f.name] for f in left}))
        raise DatasetError(
            f"the swarm's {kind.replace('_', ' ')} {source(manifest, kind)!r} is not here, and {names} came from "
            f"neither the Hugging Face hub ({why}) nor any of the swarm's peers. Connect this machine to the "
            f"internet once, or copy the files into {directory}; they are checked against the swarm's manifest."
        )


def fetch_from_hub(
    repo: str, files: list[Pinned], directory: Path, stop: threading.Event | None = None
) -> dict[str, str]:
    """Download ``files`` from the hub repository ``repo`` at their pinned commit (``HF_ENDPOINT``, default
    huggingface.co), each checked before it is kept. Returns {name: why} for those it could not.

    Raises:
        Stopped: ``stop`` was set (checked between chunks).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return {f.name: "offline: HF_HUB_OFFLINE is set" for f in files}
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    failed = {}
    for file in files:
        if not file.revision:
            failed[file.name] = "pinned from a local directory, not from the hub"
            continue
        url = hf_hub_url(repo, file.name, revision=file.revision, endpoint=endpoint)  # the hub client's file URL
        try:
            with (
                urllib.request.urlopen(url, timeout=HUB_TIMEOUT_S) as answer,  # noqa: S310 - http(s) endpoint
                CheckedFile(file, directory, f"the hub ({endpoint})") as received,
            ):
                while block := answer.read(min(CHUNK, file.size - received.size + 1)):
                    if stop is not None and stop.is_set():
                        raise Stopped
                    received.add(block)
                received.finish()
        except (OSError, ValueError) as e:
            failed[file.name] = f"{type(e).__name__}: {e}"[:200]
            logger.info("The hub did not give %s: %s", file.name, failed[file.name])
        else:
            logger.info("Took %s from the hub (%s): it matches the manifest", file.name, endpoint)
    return failed


class Mismatch(ValueError):
    """Bytes that are not the pinned file: more than its size, or another hash."""


class NotHere(ValueError):
    """The peer does not serve the file: an answer, not a failure (it is not asked again)."""


class CheckedFile:
    """A pinned file being received: kept in its directory only if all its bytes match the manifest. Use as a
    context manager; ``add`` each block, then ``finish``."""

    def __init__(self, file: Pinned, directory: Path, origin: str):
        self.file, self.directory, self.origin = file, directory, origin
        self.part = directory / f".{file.name}.part"
        self.sha, self.size, self.said = hashlib.sha256(), 0, time.monotonic()

    def __enter__(self) -> CheckedFile:
        self.out = self.part.open("wb")
        return self

    def add(self, block: bytes) -> None:
        self.size += len(block)
        if self.size > self.file.size:
            raise Mismatch(f"{self.origin} sent more than the {self.file.size} bytes pinned for {self.file.name}")
        self.sha.update(block)
        self.out.write(block)
        if time.monotonic() - self.said > 10:
            logger.info("Fetching %s from %s: %s of %s", self.file.name, self.origin, _size(self.size),
                        _size(self.file.size))  # fmt: skip
            self.said = time.monotonic()

    def finish(self) -> None:
        """Raises ``ValueError`` if what came is not the pinned file (then nothing is kept)."""
        self.out.close()
        if self.size != self.file.size or self.sha.digest() != self.file.sha256:
            raise Mismatch(f"{self.origin} sent a {self.file.name} that does not match the swarm's manifest")
        self.part.replace(self.directory / self.file.name)

    def __exit__(self, *exc: Any) -> None:
        self.out.close()
        self.part.unlink(missing_ok=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


# -- in the DHT's process (``DHT.run_coroutine``), where its libp2p node lives --------------------------------------


async def _serve_files(_dht: Any, node: Any, paths: dict[bytes, str]) -> None:
    busy = asyncio.Semaphore(MAX_TRANSFERS)
    asked: dict[str, list[float]] = {}

    async def handle(info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sha = await asyncio.wait_for(reader.readexactly(32), 10.0)
            asker, now = str(info.peer_id), time.monotonic()
            recent = [t for t in asked.get(asker, ()) if now - t < 60.0][-PER_MINUTE:]
            asked[asker] = [*recent, now]
            if len(asked) > 1024:
                asked.clear()
            if sha not in paths or len(recent) >= PER_MINUTE or busy.locked():
                writer.write(NOT_HERE if sha not in paths else BUSY)
                await writer.drain()
                return
            async with busy:
                writer.write(SERVED)
                loop = asyncio.get_running_loop()
                with open(paths[sha], "rb") as f:
                    while block := await loop.run_in_executor(None, f.read, CHUNK):
                        writer.write(block)
                        await writer.drain()
        except Exception as e:  # noqa: BLE001 - an asker that goes away or misbehaves ends its own transfer
            logger.debug("Serving a file ended: %r", e)
        finally:
            writer.close()

    await node.p2p.add_binary_stream_handler(PROTOCOL, handle)


async def _fetch_from_peers(_dht: Any, node: Any, wants: list[tuple[bytes, int, str, str]]) -> tuple[list, list]:
    """([(sha256, the peer that served it)] for each wanted file some peer served as pinned, [(name, peer, why)]
    for each file a peer served that is not the pinned one)."""
    peers = [info.peer_id for info in await node.p2p.list_peers()]
    random.shuffle(peers)
    took, refused = [], []
    asking = peers[:PEERS_ASKED]
    for sha, size, name, directory in wants:
        file, answered = Pinned("", name, sha, size, ""), set()
        for turn, peer in enumerate(asking * 2):  # each peer twice: busy, or one stream that failed, is no answer
            if turn == len(asking):
                await asyncio.sleep(RETRY_AFTER_S)
            if peer in answered:
                continue
            try:
                await asyncio.wait_for(_fetch_one(node.p2p, peer, file, Path(directory)), 30.0 + size / MIN_RATE)
            except NotHere:
                answered.add(peer)
                continue
            except Mismatch as e:
                refused.append((name, peer.to_base58(), str(e)))
                answered.add(peer)
                continue
            except Exception as e:  # noqa: BLE001 - a peer without the file, gone, busy or slow: ask the next
                logger.debug("Peer %s did not give %s: %r", peer, name, e)
                continue
            took.append((sha, peer.to_base58()))
            break
    return took, refused


async def _fetch_one(p2p: Any, peer: Any, file: Pinned, directory: Path) -> None:
    _, reader, writer = await p2p.call_binary_stream_handler(peer, PROTOCOL)
    try:
        writer.write(file.sha256)
        await writer.drain()
        status = await reader.readexactly(1)
        if status == NOT_HERE:
            raise NotHere("not served there")
        if status != SERVED:
            raise ValueError("busy")
        with CheckedFile(file, directory, f"peer {peer}") as received:
            while received.size < file.size:
                block = await reader.read(min(CHUNK, file.size - received.size))
                if not block:
                    raise ValueError(f"the transfer ended {file.size - received.size} bytes short")
                received.add(block)
            received.finish()
    finally:
        writer.close()
