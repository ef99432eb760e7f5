"""A joiner's first run needs nothing by hand (swarm/pinned_files.py, swarm/file_sharing.py): the seeder pins its
tokenizer's files in the manifest; a joiner without them takes them from a hub (here a local HTTP server standing
in for huggingface.co) or from the swarm's peers (real hivemind nodes), and keeps only files that match."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import logging
import re
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import hivemind
import pytest
import torch

from p2ptrain.errors import DatasetError
from p2ptrain.local_swarm import DEMO_PEER_FLAGS, DEMO_SWARM_FLAGS, LocalSwarm
from p2ptrain.swarm import file_sharing
from p2ptrain.swarm.file_sharing import fetch_from_hub, provide, serve
from p2ptrain.swarm.pinned_files import pin, pinned, store, where
from p2ptrain.train.tokenizer import ByteTokenizer, load_tokenizer

REPO, COMMIT = "test-org/tiny-bytes", "c0ffee" + "0" * 34


def hub_cache(root: Path) -> Path:
    """A Hugging Face cache (the hub client's own layout) holding REPO at COMMIT: a real tokenizer that transformers
    loads, written by ByteTokenizer, and the model's config.json (AutoTokenizer reads it from a cache, as for gpt2)."""
    from transformers import GPT2Config

    repo = root / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    ByteTokenizer().save_pretrained(snapshot)
    GPT2Config(vocab_size=257, bos_token_id=256, eos_token_id=256).save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def seeder_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "seeder-cache"))
    return hub_cache(tmp_path / "seeder-cache")


@pytest.fixture
def pinning(manifest, seeder_cache):
    """The swarm's manifest with REPO's tokenizer pinned, as ``seed --tokenizer test-org/tiny-bytes`` makes it."""
    return dataclasses.replace(manifest, tokenizer=REPO, files=pin("tokenizer", REPO))


class FakeHub(http.server.ThreadingHTTPServer):
    """huggingface.co's file URLs (``/<repo>/resolve/<revision>/<file>``) on 127.0.0.1, served from ``directory``;
    ``tamper`` flips a byte of every file it serves."""

    def __init__(self, directory: Path, tamper: bool = False):
        self.directory, self.tamper, self.asked = directory, tamper, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hub.asked.append(self.path)
                found = re.fullmatch(rf"/{REPO}/resolve/{COMMIT}/([\w.]+)", self.path)
                path = hub.directory / found[1] if found else None
                if path is None or not path.is_file():
                    self.send_error(404)
                    return
                body = bytearray(path.read_bytes())
                if hub.tamper:
                    body[len(body) // 2] ^= 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def online(monkeypatch):
    """A machine with internet: the hub is whatever ``HF_ENDPOINT`` names."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def same_ids(directory: str) -> bool:
    text = "naïve café, 42 \U0001f600"
    return load_tokenizer(directory).encode(text) == ByteTokenizer().encode(text)


def test_the_seeder_pins_the_tokenizer_files_of_its_cache_with_their_commit(pinning, seeder_cache):
    files = pinned(pinning, "tokenizer")
    assert {f.name for f in files} == {p.name for p in seeder_cache.iterdir()} >= {"tokenizer.json"}
    for f in files:
        assert f.revision == COMMIT and f.sha256 == hashlib.sha256((seeder_cache / f.name).read_bytes()).digest()
    assert where(pinning, "tokenizer", Path("/nonexistent")) == str(seeder_cache)  # the seeder loads its own


def test_a_tokenizer_in_no_cache_cannot_be_seeded_and_the_error_says_what_works(seeder_cache):
    with pytest.raises(DatasetError, match=r"huggingface-cli download other/tok.*--tokenizer bytes"):
        pin("tokenizer", "other/tok")


def test_a_joiner_with_internet_takes_the_files_from_the_hub_at_the_pinned_commit(
    pinning, seeder_cache, tmp_path, online, monkeypatch
):
    hub = FakeHub(seeder_cache)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        files = pinned(pinning, "tokenizer")
        directory = store(tmp_path / "joiner", files)
        directory.mkdir(parents=True)
        assert fetch_from_hub(REPO, files, directory) == {}
        assert sorted(hub.asked) == sorted(f"/{REPO}/resolve/{COMMIT}/{f.name}" for f in files)
        assert same_ids(str(directory))
    finally:
        hub.shutdown()


def test_files_from_a_hub_that_does_not_match_the_manifest_are_not_kept(
    pinning, seeder_cache, tmp_path, online, monkeypatch
):
    hub = FakeHub(seeder_cache, tamper=True)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        files = pinned(pinning, "tokenizer")
        directory = tmp_path / "joiner"
        directory.mkdir()
        failed = fetch_from_hub(REPO, files, directory)
        assert set(failed) == {f.name for f in files}
        assert all("does not match the swarm's manifest" in why for why in failed.values())
        assert list(directory.iterdir()) == []
    finally:
        hub.shutdown()


@pytest.fixture
def two_nodes():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
    yield first, second
    for node in (second, first):
        node.shutdown()


def test_an_offline_joiner_takes_the_files_from_a_peer_that_holds_them(
    pinning, seeder_cache, tmp_path, two_nodes, monkeypatch, caplog
):
    seeder, joiner = two_nodes
    assert provide(seeder, pinning, tmp_path / "seeder") == {"tokenizer": str(seeder_cache), "init_weights": ""}
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # a new machine
    with caplog.at_level(logging.INFO, logger="p2ptrain.swarm.file_sharing"):
        found = provide(joiner, pinning, tmp_path / "joiner")
    assert found["tokenizer"] == str(store(tmp_path / "joiner", pinned(pinning, "tokenizer")))
    assert same_ids(found["tokenizer"])
    assert f"from peer {seeder.peer_id.to_base58()}: it matches the manifest" in caplog.text
    assert "offline: HF_HUB_OFFLINE is set" not in caplog.text  # the hub was not needed... nor asked, offline


def test_a_peer_that_serves_other_bytes_is_refused_and_the_error_names_the_files(
    pinning, seeder_cache, tmp_path, two_nodes, monkeypatch, caplog
):
    liar, joiner = two_nodes
    forged = tmp_path / "forged"
    forged.write_bytes(b"{}" * 2_000_000)  # longer than any pinned file: the joiner reads its size, then checks
    paths = {f.sha256: str(forged) for f in pinned(pinning, "tokenizer")}  # claims every pinned hash
    serve(liar, paths)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.monotonic()
    with pytest.raises(DatasetError) as refused:
        provide(joiner, pinning, tmp_path / "joiner")
    assert time.monotonic() - started < 30
    message = str(refused.value)
    assert "tokenizer.json (sha256" in message and "offline: HF_HUB_OFFLINE is set" in message
    assert "nor any of the swarm's peers" in message
    assert not any((tmp_path / "joiner").rglob("tokenizer.json"))
    assert (
        f"Refused tokenizer.json from peer {liar.peer_id}: peer {liar.peer_id} sent a tokenizer.json that does "
        "not match the swarm's manifest" in caplog.text
    )


async def _stall(_dht, node) -> None:
    """A peer that takes every file request and never answers (in its DHT's process)."""
    import asyncio

    async def handle(_info, _reader, _writer) -> None:
        await asyncio.sleep(3600)

    await node.p2p.add_binary_stream_handler(file_sharing.PROTOCOL, handle)


def test_a_peer_asked_to_stop_leaves_a_fetch_from_a_stuck_peer_at_once(
    pinning, seeder_cache, tmp_path, two_nodes, monkeypatch
):
    stuck, joiner = two_nodes
    stuck.run_coroutine(_stall)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    stop = threading.Event()
    started = time.monotonic()  # before the timer: the fetch cannot end before the stop without failing the test
    threading.Timer(1.0, stop.set).start()
    found = provide(joiner, pinning, tmp_path / "joiner", stop)  # the stuck peer would hold it for 30 s per file
    assert 1.0 <= time.monotonic() - started < 3.0
    assert "tokenizer" not in found and not any((tmp_path / "joiner").rglob("tokenizer.json"))


async def _busy_at_first(_dht, node, paths: dict) -> None:
    """A peer that answers its first file request "busy" and serves the ones after it (in its DHT's process)."""
    asked = []

    async def handle(_info, reader, writer) -> None:
        sha = await reader.readexactly(32)
        asked.append(sha)
        writer.write(file_sharing.BUSY if len(asked) == 1 else file_sharing.SERVED + Path(paths[sha]).read_bytes())
        await writer.drain()
        writer.close()

    await node.p2p.add_binary_stream_handler(file_sharing.PROTOCOL, handle)


def test_the_only_peer_that_holds_a_file_is_asked_again_when_it_was_busy(
    pinning, seeder_cache, tmp_path, two_nodes, monkeypatch
):
    holder, joiner = two_nodes
    paths = {f.sha256: str(seeder_cache / f.name) for f in pinned(pinning, "tokenizer")}
    holder.run_coroutine(partial(_busy_at_first, paths=paths))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    found = provide(joiner, pinning, tmp_path / "joiner")
    assert found["tokenizer"] == str(store(tmp_path / "joiner", pinned(pinning, "tokenizer")))
    assert same_ids(found["tokenizer"])


async def _holds_nothing(_dht, node) -> None:
    """A peer that answers every file request "not here", counting them (in its DHT's process)."""
    global ASKED_NOT_HERE
    ASKED_NOT_HERE = 0

    async def handle(_info, reader, writer) -> None:
        global ASKED_NOT_HERE
        await reader.readexactly(32)
        ASKED_NOT_HERE += 1
        writer.write(file_sharing.NOT_HERE)
        await writer.drain()
        writer.close()

    await node.p2p.add_binary_stream_handler(file_sharing.PROTOCOL, handle)


async def _asked_not_here(_dht, _node) -> int:
    return ASKED_NOT_HERE


def test_a_peer_that_does_not_hold_a_file_is_asked_for_it_once(pinning, seeder_cache, tmp_path, two_nodes, monkeypatch):
    """ "Not here" is an answer: unlike "busy" or a failed stream, it is not asked again."""
    other, joiner = two_nodes
    other.run_coroutine(_holds_nothing)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DatasetError, match="nor any of the swarm's peers"):
        provide(joiner, pinning, tmp_path / "joiner")
    assert other.run_coroutine(_asked_not_here) == len(pinned(pinning, "tokenizer"))


def test_initial_weights_named_by_the_manifest_come_from_peers_too(manifest, tmp_path, two_nodes, monkeypatch):
    """``seed --init-weights weights/start`` (a directory of the seeder's): a joiner without it takes its files."""
    import torch

    from p2ptrain.train.models import build_model

    seeder, joiner = two_nodes
    (tmp_path / "seeder" / "weights").mkdir(parents=True)
    build_model("gpt2-tiny", 257, 32, seed=7).save_pretrained(tmp_path / "seeder" / "weights" / "start")
    monkeypatch.chdir(tmp_path / "seeder")
    files = pin("init_weights", "weights/start")
    with_weights = dataclasses.replace(manifest, init_weights="weights/start", files=files)
    assert {f.name for f in pinned(with_weights, "init_weights")} >= {"config.json", "model.safetensors"}
    assert all(f.revision == "" for f in pinned(with_weights, "init_weights"))  # a local directory: peers only
    provide(seeder, with_weights, tmp_path / "seeder")
    monkeypatch.chdir(tmp_path)  # the joiner has no weights/start
    found = provide(joiner, with_weights, tmp_path / "joiner")["init_weights"]
    assert found.startswith(str(tmp_path / "joiner" / "files" / "init_weights-"))
    start = build_model("gpt2-tiny", 257, 32, seed=0, init_weights=found)
    expected = build_model("gpt2-tiny", 257, 32, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(start.parameters(), expected.parameters(), strict=True))


@pytest.mark.slow
def test_new_machines_join_and_export_with_the_files_and_state_their_peers_serve(tmp_path):
    """What volunteers and researchers run on a new machine: the seeder has the tokenizer in its Hugging Face cache;
    a joiner with an empty cache and no hub (HF_HUB_OFFLINE, as every test) takes the files from the seeder and
    trains; then ``export --from-swarm --invite`` from a third empty machine takes the files and the swarm's current
    state from the peers (a late joiner's checked download) and writes an export that transformers loads."""
    from transformers import AutoModelForCausalLM

    from p2ptrain.export import swarm_manifest
    from p2ptrain.train.models import build_model

    hub_cache(tmp_path / "seeder-cache")
    cache = lambda name: ("env", f"HF_HUB_CACHE={tmp_path / name}")  # noqa: E731
    with LocalSwarm(tmp_path, swarm_flags=DEMO_SWARM_FLAGS, peer_flags=DEMO_PEER_FLAGS) as swarm:
        a = swarm.seed("a", "--tokenizer", REPO, "--wait-for-peers", "2", prefix=cache("seeder-cache"))
        invite = swarm.invite(a)
        b = swarm.join("b", "--invite", invite, "--wait-for-peers", "2", prefix=cache("joiner-cache"))
        for peer in (a, b):
            swarm.wait_for(peer, lambda s: s.get("epoch", 0) >= 2, 180, "two global steps")
        out = tmp_path / "export"
        command = [*cache("exporter-cache"), sys.executable, "-m", "p2ptrain", "export", "--out", str(out),
                   "--from-swarm", "--invite", invite, "--data-dir", str(tmp_path / "exporter")]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        swarm_epoch = min(int(p.status()["epoch"]) for p in (a, b))
    log = b.log()
    assert "Fetching the swarm's tokenizer" in log and "it matches the manifest" in log
    assert not (tmp_path / "joiner-cache" / f"models--{REPO.replace('/', '--')}").exists()
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"Exported swarm (\S+) at global step (\d+) \(([\d,]+) tokens", done.stdout)
    assert found and 2 <= int(found[2]) <= swarm_epoch + 1, done.stdout
    card = (out / "README.md").read_text()
    assert f"| global step | {found[2]} |" in card and f"| tokenizer | {REPO} |" in card
    assert re.search(r"\| peers \| [12] \(in the swarm when exported\) \|", card), card  # its progress records'
    assert any((tmp_path / "exporter" / "files").glob("tokenizer-*/tokenizer.json"))  # from the peers, checked
    exported = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    manifest = swarm_manifest(tmp_path / "a")  # the seeder's: the swarm's initial weights derive from its seed
    initial = build_model(manifest.model, 257, manifest.seq_len, manifest.seed, "", 256)
    assert exported.transformer.wte.weight.shape == initial.transformer.wte.weight.shape
    assert not torch.equal(exported.transformer.wte.weight, initial.transformer.wte.weight)  # trained, not initial
