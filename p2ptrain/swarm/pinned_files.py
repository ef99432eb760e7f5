"""The files a swarm needs besides the code: its tokenizer's and any initial weights'. The researcher's manifest pins
each by name, SHA-256 and size (``SwarmManifest.files``, manifest version 4), and the hub commit it came from, so
that a volunteer can take them from anyone: the Hugging Face hub, or the swarm's peers (``file_sharing``). A pinned
file is used only once its bytes match the manifest.

Where a peer looks, in order: the source the manifest names (a local directory, or the Hugging Face cache, where
the seeder has them), then its own store ``<data_dir>/files/<kind>-<id>/``, where fetched files are written.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2ptrain.errors import DatasetError
from p2ptrain.swarm.manifest import SwarmManifest

# what each kind's loader reads (transformers' AutoTokenizer, GPT2LMHeadModel.from_pretrained with safetensors)
ALLOWED = {
    "tokenizer": (
        "added_tokens.json", "config.json", "merges.txt", "special_tokens_map.json", "spiece.model",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
    ),
    "init_weights": ("config.json", "generation_config.json", "model.safetensors"),
}  # fmt: skip
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Pinned:
    """One file of a manifest: ``kind`` ("tokenizer" or "init_weights") and its ``name`` in that directory."""

    kind: str
    name: str
    sha256: bytes
    size: int
    revision: str  # the hub commit it was pinned from; "" if it came from a local directory (peers only)


def source(manifest: SwarmManifest, kind: str) -> str:
    """What the manifest names for ``kind``: a hub repository or a local directory ("" for none)."""
    return manifest.tokenizer if kind == "tokenizer" else manifest.init_weights


def pinned(manifest: SwarmManifest, kind: str) -> list[Pinned]:
    return [
        Pinned(kind, key.split("/", 1)[1], entry["sha256"], entry["size"], entry["revision"])
        for key, entry in sorted(manifest.files.items())
        if key.split("/", 1)[0] == kind
    ]


def digest(path: Path, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """(SHA-256, size) of a file."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            size += len(block)
    return sha.digest(), size


def local_source(name: str) -> tuple[Path, str] | None:
    """(the directory, its hub commit or "") where ``name`` is on this machine: a local directory, or the newest
    snapshot of the hub repository ``name`` in the Hugging Face cache. None if neither."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve(), ""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid repository name: not here either way
        return None
    return snapshot, snapshot.name if _COMMIT.fullmatch(snapshot.name) else ""


def pin(kind: str, name: str) -> dict[str, dict[str, Any]]:
    """The manifest entries for ``kind`` as found here (the seeder): every file its loader reads.

    Raises:
        DatasetError: ``name`` is neither a local directory nor in the Hugging Face cache.
    """
    found = local_source(name)
    if found is None:
        what, verb = ("tokenizer", "is") if kind == "tokenizer" else ("initial weights", "are")
        raise DatasetError(
            f"the {what} {name!r} {verb} not in the local Hugging Face cache or a local directory. Fetch them "
            f"once where there is internet (`huggingface-cli download {name}`), then seed again"
            + (", or seed with --tokenizer bytes, which needs no file." if kind == "tokenizer" else ".")
        )
    directory, revision = found
    entries = {}
    for file in sorted(directory.iterdir()):
        if file.name in ALLOWED[kind] and file.is_file():
            sha, size = digest(file)
            entries[f"{kind}/{file.name}"] = {"sha256": sha, "size": size, "revision": revision}
    return entries


def pin_all(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``files`` of a new manifest made from ``values`` (its other fields): the tokenizer's files unless it is
    "bytes", and the initial weights' if any."""
    files = {} if values.get("tokenizer", "bytes") == "bytes" else pin("tokenizer", values["tokenizer"])
    if values.get("init_weights"):
        files.update(pin("init_weights", values["init_weights"]))
    return files


def store(data_dir: Path, files: list[Pinned]) -> Path:
    """This peer's directory for fetched ``files`` (one kind): named after their hashes, so that swarms pinning
    the same files share it and different ones never mix."""
    kinds = {f.kind for f in files}
    if len(kinds) != 1:
        raise ValueError(f"files of one kind only, got {sorted(kinds)}")
    key = hashlib.sha256(b"".join(f.name.encode() + b"\0" + f.sha256 for f in files)).hexdigest()[:16]
    return data_dir / "files" / f"{kinds.pop()}-{key}"


def matches(directory: Path, file: Pinned) -> bool:
    path = directory / file.name
    try:
        return path.is_file() and path.stat().st_size == file.size and digest(path)[0] == file.sha256
    except OSError:
        return False


def find(manifest: SwarmManifest, kind: str, data_dir: Path) -> tuple[Path | None, list[Pinned]]:
    """(a directory that holds every pinned file of ``kind``, []) if this peer has one; else (its store, the files
    missing there). Nothing pinned: (None, [])."""
    files = pinned(manifest, kind)
    if not files:
        return None, []
    found = local_source(source(manifest, kind))
    if found is not None and all(matches(found[0], f) for f in files):
        return found[0], []
    own = store(data_dir, files)
    return own, [f for f in files if not matches(own, f)]


def where(manifest: SwarmManifest, kind: str, data_dir: Path) -> str:
    """What to load ``kind`` from: the directory holding its pinned files, or the manifest's own name (nothing
    pinned, or not all here: its loader then says what is missing)."""
    directory, missing = find(manifest, kind, data_dir)
    return str(directory) if directory is not None and not missing else source(manifest, kind)
