"""The swarm manifest: what every peer of a swarm must agree on, signed by the researcher.

The wire format is specified in ``protocols/manifest.md`` (golden vectors in ``protocols/vectors``):

    envelope = msgpack {"manifest": <canonical manifest bytes>, "signature": <64-byte Ed25519>}
    manifest hash = SHA-256(canonical manifest bytes)

The author's public key is a field of the manifest, so the hash (carried by invites) pins both the
content and who signed it. Decoding is strict: unknown versions, missing or extra fields, wrong
types and out-of-range values are refused with ``ManifestInvalid`` before anything is built.

The manifest is shared by the swarm; what is particular to one machine (device, paths, ports,
batch per step) lives in ``settings.PeerSettings``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2ptrain.errors import ConfigError, ManifestInvalid

MANIFEST_VERSION = 5  # 2 added averaging.aggregation, 3 admission, 4 files, 5 averaging.group_size/sync_every; older
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # manifests are still read (ADDED_IN)
MAX_ENVELOPE_BYTES = 16 * 1024  # a manifest is a few hundred bytes; anything larger is refused unread
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
COMPRESSIONS = ("none", "fp16", "int8", "int4", "int2", "powersgd", "randk", "randk-int4", "randk-int2", "adaptive")
MODES = ("gradients", "local")
AGGREGATIONS = ("centered_clip", "trimmed_mean", "median", "mean")  # train/robust.py
ADMISSIONS = ("open", "token")  # swarm/admission.py
# fields that later versions added: (version, section or None for the top level, name, its value in older manifests)
ADDED_IN = (
    (2, "averaging", "aggregation", "mean"),
    (3, None, "admission", "open"),
    (4, None, "files", {}),
    (5, "averaging", "group_size", 0),
    (5, "averaging", "sync_every", 0),
)
GROUPED_COMPRESSIONS = ("none", "fp16", "int8", "adaptive")  # dense: a grouped round's levels chain their averages
MAX_GROUP_SIZE = 256
_FILE_KEY = re.compile(r"^(tokenizer|init_weights)/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # swarm/pinned_files.py
MAX_FILES = 32
MAX_FILE_BYTES = 2**40


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW, applied by every peer to the swarm-averaged gradient once per global step (epoch)."""

    lr: float = 6e-4  # peak learning rate (GPT-2 small used 6e-4)
    weight_decay: float = 0.1  # decoupled weight decay (AdamW)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_epochs: int = 10  # linear warm-up over this many global steps
    clip_grad_norm: float = 1.0  # 0 disables clipping; applied to each peer's local gradient


@dataclass(frozen=True)
class AveragingSpec:
    """What peers average, how it is compressed, and how they meet (protocols/averaging.md)."""

    compression: str = "fp16"  # codec on the wire: one of COMPRESSIONS ("adaptive": mode "local" only;
    #   "powersgd": mode "gradients" only)
    mode: str = "gradients"  # "gradients": average gradients every global step (hivemind.Optimizer);
    #   "local": DiLoCo — local AdamW steps, then average pseudo-gradients once per global step
    sparsity: float = 0.1  # random-k (randk, randk-int4, randk-int2): the fraction of coordinates sent each round
    powersgd_rank: int = 4  # PowerSGD: rank of the low-rank factors
    outer_lr: float = 0.7  # local mode: outer SGD learning rate on the averaged pseudo-gradient
    outer_momentum: float = 0.9  # local mode: outer Nesterov momentum
    comm_budget: float = 0.5  # adaptive: keep the expected round time within this fraction of compute time
    matchmaking_time_s: float = 5.0  # how long peers gather a group before averaging; raise it if
    #   the log says "Proceeding with local gradients" while others are alive
    averaging_timeout_s: float = 30.0  # give up on a round (and use local gradients) after this
    average_state_every: int = 0  # also average parameters/optimizer state every N global steps; 0: never. Gradient
    #   rounds give every member the same average, and the parameter check resynchronises a peer that differs;
    #   hivemind's state rounds group whoever is ready, and leave their members apart from the rest
    aggregation: str = "centered_clip"  # how the peer that aggregates a part reduces the members' copies of it:
    #   one of AGGREGATIONS (train/robust.py); absent from version 1 manifests, which averaged by "mean"
    group_size: int = 0  # 0: every peer looks for one group (hivemind's matchmaking); N >= 2 (mode "local"): groups of
    #   at most N nearby peers, then one peer of each group across (swarm/grouping.py, train/level_rounds.py)
    sync_every: int = 0  # mode "local": every N global steps the round averages the parameters themselves, exactly
    #   (4 bytes a value), and every member takes the average as its anchor; 0: never


@dataclass(frozen=True)
class SwarmManifest:
    """Everything a peer needs to build the same model and train on the same task."""

    run_id: str  # the swarm's name: hivemind's DHT prefix, [a-z0-9_-], ≤ 64 chars
    model: str  # a name in models.REGISTRY
    dataset: str  # "default" (embedded corpus), a local path, or a Hugging Face dataset name
    tokenizer: str  # "bytes" (offline byte-level) or a Hugging Face tokenizer name/path ("gpt2")
    seq_len: int  # tokens per training sample
    target_batch_size: int  # samples the whole swarm accumulates per global step
    author_key: bytes  # the researcher's Ed25519 public key (32 bytes), covered by the hash
    created_at: int  # unix seconds
    dataset_config: str = ""  # Hugging Face dataset configuration name, "" for none
    text_field: str = "text"  # the column/JSON key that holds the text
    init_weights: str = ""  # "" = random init from `seed`; else a local dir / HF cache name (safetensors only)
    seed: int = 0  # random init and data order derive from it, so peers start from identical weights
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    averaging: AveragingSpec = field(default_factory=AveragingSpec)
    admission: str = "open"  # "open": anyone may take part; "token": only peers with a join token signed by the
    #   author (``p2ptrain seed --private``; swarm/admission.py)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # the tokenizer's and initial weights' files:
    #   "<kind>/<name>" → {"sha256": 32 bytes, "size": bytes, "revision": hub commit or ""} (swarm/pinned_files.py)
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    def encode(self) -> bytes:
        """Canonical bytes: msgpack of the fields with sorted keys, so equal manifests hash equally. An older
        manifest is written without the fields its version did not have, so its bytes (and hash) stay as signed."""
        values = asdict(self)
        for version, section, name, _ in ADDED_IN:
            if self.version < version:
                del (values[section] if section else values)[name]
        return msgpack.packb(_sorted(values), use_bin_type=True)

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, data: bytes) -> SwarmManifest:
        raw = _unpack(data, "manifest")
        if not isinstance(raw, dict):
            raise ManifestInvalid("manifest is not a map")
        if raw.get("version") not in READABLE_VERSIONS:
            raise ManifestInvalid(
                f"manifest version {raw.get('version')!r} is not supported (this p2ptrain reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}). Upgrade p2ptrain, or ask the researcher for a compatible "
                f"swarm."
            )
        try:
            for version, section, name, old in ADDED_IN:
                where = raw.get(section) if section else raw
                if raw["version"] < version and isinstance(where, dict) and name not in where:
                    where = {**where, name: old}
                    raw = {**raw, section: where} if section else where
            raw["optimizer"] = _build(OptimizerSpec, raw.get("optimizer"))
            raw["averaging"] = _build(AveragingSpec, raw.get("averaging"))
            return _build(cls, raw)
        except (TypeError, ValueError) as e:
            raise ManifestInvalid(f"manifest has invalid fields: {e}") from None


def _sorted(value: Any) -> Any:
    return {k: _sorted(value[k]) for k in sorted(value)} if isinstance(value, dict) else value


def _unpack(data: bytes, what: str) -> Any:
    if not isinstance(data, bytes) or len(data) > MAX_ENVELOPE_BYTES:
        raise ManifestInvalid(f"{what} is not bytes or is larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)  # size bounded above
    except (ValueError, msgpack.UnpackException) as e:
        raise ManifestInvalid(f"{what} is not valid msgpack: {e}") from None


def _build(cls: type, raw: Any) -> Any:
    """Build a dataclass from a decoded map, refusing missing/extra keys and wrong types."""
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__} must be a map, got {type(raw).__name__}")
    names = {f.name: f for f in fields(cls)}
    extra, missing = set(raw) - set(names), set(names) - set(raw)
    if extra or missing:
        raise TypeError(f"{cls.__name__} has unknown fields {sorted(extra)} / lacks fields {sorted(missing)}")
    for name, value in raw.items():
        expected = names[name].type
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, float),  # not int: 0 and 0.0 would encode (and hash) differently
            "bytes": isinstance(value, bytes),
        }.get(str(expected), True)
        if not ok:
            raise TypeError(f"{cls.__name__}.{name} must be {expected}, got {type(value).__name__}")
    return cls(**raw)


def _validate(m: SwarmManifest) -> None:
    """Type and range checks shared by construction from flags and decoding from the network."""
    for spec in (m.optimizer, m.averaging):
        for f in fields(spec):
            if f.type == "float" and not isinstance(getattr(spec, f.name), float):
                raise ValueError(f"{type(spec).__name__}.{f.name} must be a float, got {getattr(spec, f.name)!r}")
    checks = [
        (bool(_RUN_ID.fullmatch(m.run_id)), f"run_id {m.run_id!r} must match {_RUN_ID.pattern}"),
        (0 < len(m.model) <= 64, "model name must be 1-64 characters"),
        (0 < len(m.dataset) <= 512, "dataset must be 1-512 characters"),
        (0 < len(m.tokenizer) <= 512, "tokenizer must be 1-512 characters"),
        (len(m.dataset_config) <= 128 and len(m.text_field) <= 128, "dataset_config/text_field too long"),
        (len(m.init_weights) <= 512, "init_weights too long"),
        (8 <= m.seq_len <= 8192, f"seq_len {m.seq_len} must be in [8, 8192]"),
        (1 <= m.target_batch_size <= 10_000_000, f"target_batch_size {m.target_batch_size} out of range"),
        (len(m.author_key) == 32, "author_key must be a 32-byte Ed25519 public key"),
        (0 <= m.seed < 2**32, "seed must be in [0, 2**32)"),
        (0 < m.optimizer.lr < 1, f"lr {m.optimizer.lr} must be in (0, 1)"),
        (0 <= m.optimizer.weight_decay < 10, "weight_decay out of range"),
        (0 <= m.optimizer.beta1 < 1 and 0 <= m.optimizer.beta2 < 1, "betas must be in [0, 1)"),
        (0 < m.optimizer.eps < 1, "eps out of range"),
        (0 <= m.optimizer.warmup_epochs <= 10**6, "warmup_epochs out of range"),
        (0 <= m.optimizer.clip_grad_norm <= 1e6, "clip_grad_norm out of range"),
        (m.averaging.compression in COMPRESSIONS, f"compression must be one of {COMPRESSIONS}"),
        (m.averaging.mode in MODES, f"averaging mode must be one of {MODES}"),
        (
            not (m.averaging.compression == "adaptive" and m.averaging.mode != "local"),
            "compression adaptive needs averaging mode local",
        ),
        (
            not (m.averaging.compression == "powersgd" and m.averaging.mode != "gradients"),
            "compression powersgd needs averaging mode gradients",
        ),
        (0.001 <= m.averaging.sparsity <= 1, "sparsity must be in [0.001, 1]"),
        (1 <= m.averaging.powersgd_rank <= 1024, "powersgd_rank must be in [1, 1024]"),
        (0 < m.averaging.outer_lr <= 10, "outer_lr must be in (0, 10]"),
        (0 <= m.averaging.outer_momentum < 1, "outer_momentum must be in [0, 1)"),
        (0.01 <= m.averaging.comm_budget <= 10, "comm_budget must be in [0.01, 10]"),
        (0.1 <= m.averaging.matchmaking_time_s <= 600, "matchmaking_time_s must be in [0.1, 600]"),
        (0.5 <= m.averaging.averaging_timeout_s <= 3600, "averaging_timeout_s must be in [0.5, 3600]"),
        (0 <= m.averaging.average_state_every <= 10**6, "average_state_every must be in [0, 10**6] (0: never)"),
        (m.averaging.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}"),
        (m.version in READABLE_VERSIONS, f"version must be one of {READABLE_VERSIONS}"),
        (m.version > 1 or m.averaging.aggregation == "mean", "a version 1 manifest averages by mean"),
        (m.admission in ADMISSIONS, f"admission must be one of {ADMISSIONS}"),
        (m.version > 2 or m.admission == "open", "a version 1 or 2 manifest is open to all"),
        (m.version > 3 or not m.files, "a manifest before version 4 pins no files"),
        (m.averaging.group_size == 0 or 2 <= m.averaging.group_size <= MAX_GROUP_SIZE, "group_size: 0 or 2-256"),
        (m.averaging.group_size == 0 or m.averaging.mode == "local", "group_size needs averaging mode local"),
        (
            m.averaging.group_size == 0 or m.averaging.compression in GROUPED_COMPRESSIONS,
            f"group_size needs a compression among {GROUPED_COMPRESSIONS}",
        ),
        (m.version > 4 or m.averaging.group_size == 0, "a manifest before version 5 has one group for all"),
        (0 <= m.averaging.sync_every <= 10**6, "sync_every must be in [0, 10**6] (0: never)"),
        (m.averaging.sync_every == 0 or m.averaging.mode == "local", "sync_every needs averaging mode local"),
        (m.version > 4 or m.averaging.sync_every == 0, "a manifest before version 5 never syncs parameters"),
        (_files_ok(m.files), f"files must map at most {MAX_FILES} names <kind>/<file> to their sha256/size/revision"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _files_ok(files: Any) -> bool:
    def entry_ok(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and set(value) == {"sha256", "size", "revision"}
            and isinstance(value["sha256"], bytes)
            and len(value["sha256"]) == 32
            and type(value["size"]) is int
            and 0 <= value["size"] <= MAX_FILE_BYTES
            and isinstance(value["revision"], str)
            and re.fullmatch(r"[0-9a-f]{40}|", value["revision"]) is not None
        )

    return (
        isinstance(files, dict)
        and len(files) <= MAX_FILES
        and all(isinstance(k, str) and _FILE_KEY.fullmatch(k) and entry_ok(v) for k, v in files.items())
    )


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_manifest(key: Ed25519PrivateKey, **values: Any) -> SwarmManifest:
    """A manifest authored by ``key`` (its public key and the creation time filled in)."""
    values.setdefault("created_at", int(time.time()))
    try:
        return SwarmManifest(author_key=public_key_bytes(key), **values)
    except ValueError as e:
        raise ConfigError(f"invalid swarm setting: {e}") from None


def sign(manifest: SwarmManifest, key: Ed25519PrivateKey) -> bytes:
    """The signed envelope to publish. ``key`` must be the manifest's author."""
    if public_key_bytes(key) != manifest.author_key:
        raise ValueError("the signing key is not the manifest's author_key")
    body = manifest.encode()
    return msgpack.packb({"manifest": body, "signature": key.sign(body)}, use_bin_type=True)


def verify(envelope: bytes, expected_hash: bytes | None = None) -> SwarmManifest:
    """Decode a signed envelope; check its hash (when known) and its author's signature.

    Raises:
        ManifestInvalid: malformed, oversized, hash mismatch, bad signature or invalid fields.
    """
    raw = _unpack(envelope, "manifest envelope")
    if not isinstance(raw, dict) or set(raw) != {"manifest", "signature"}:
        raise ManifestInvalid("manifest envelope must hold exactly 'manifest' and 'signature'")
    body, signature = raw["manifest"], raw["signature"]
    if not isinstance(body, bytes) or not isinstance(signature, bytes) or len(signature) != 64:
        raise ManifestInvalid("manifest envelope fields have the wrong types")
    if expected_hash is not None and hashlib.sha256(body).digest() != expected_hash:
        raise ManifestInvalid(
            f"manifest hash {hashlib.sha256(body).hexdigest()[:16]}… does not match the invite's "
            f"{expected_hash.hex()[:16]}…. The peer served a different or tampered manifest; ask for a new invite."
        )
    manifest = SwarmManifest.decode(body)
    if manifest.encode() != body:
        raise ManifestInvalid("manifest is not in canonical form (keys unsorted or fields re-encoded)")
    try:
        Ed25519PublicKey.from_public_bytes(manifest.author_key).verify(signature, body)
    except InvalidSignature:
        raise ManifestInvalid(
            "manifest signature does not match its author key: it was altered after signing. "
            "Do not join this swarm; ask the researcher for a new invite."
        ) from None
    return manifest
