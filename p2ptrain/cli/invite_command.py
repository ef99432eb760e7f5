"""``p2ptrain invite``: more invites to a private swarm, delegation, and revocation (``swarm/admission.py``).

It works from the data directory of a peer of the swarm (the seeder's, or a delegate's), whose last swarm it reads,
and needs no network: a revocation is published by that peer, while it runs, within a minute.
"""

from __future__ import annotations

import base64
from typing import Annotated

import msgpack
import typer

from p2ptrain.cli.daemon_commands import daemon_dir
from p2ptrain.cli.options import DataDir
from p2ptrain.errors import ConfigError


def invite(
    days: Annotated[float, typer.Option(help="days the new invite stays valid")] = 7.0,
    delegate: Annotated[
        bool, typer.Option("--delegate", help="the new invite may itself make invites (seeder only)")
    ] = False,
    revoke: Annotated[
        list[str] | None, typer.Option(help="revoke this join token (its id, as printed); repeatable")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Make a new invite to your private swarm (or revoke one): for the swarm this data directory last joined."""
    from p2ptrain.fileio import atomic_write_bytes, read_json
    from p2ptrain.swarm import admission as adm
    from p2ptrain.swarm import manifest as mf
    from p2ptrain.swarm.identity import author_key
    from p2ptrain.swarm.invite import Invite, decode_invite
    from p2ptrain.swarm.joining import recall_swarm, revocations_path, token_path

    directory = daemon_dir(data_dir)
    remembered = recall_swarm(directory)
    if "envelope" not in remembered:
        raise ConfigError(f"no swarm in {directory}: run `p2ptrain seed --private …` there first (or give --data-dir)")
    manifest = mf.verify(base64.b64decode(remembered["envelope"]))
    if manifest.admission == "open":
        raise ConfigError(f"swarm {manifest.run_id} is open: anyone with its invite (p2ptrain status) may join")
    key = author_key(directory) if (directory / "author.key").exists() else None
    is_author = key is not None and mf.public_key_bytes(key) == manifest.author_key
    if revoke:
        if not is_author:
            raise ConfigError(f"only the author of swarm {manifest.run_id} can revoke its join tokens")
        ids = _read_ids(revoke)
        path = revocations_path(directory, manifest.run_id)
        held: list[bytes] = []
        if path.exists():
            held = adm.read_revocations(path.read_bytes(), manifest.author_key)[1]
        atomic_write_bytes(path, adm.sign_revocations(key, manifest.run_id, held + ids))
        print(
            f"Revoked {', '.join(i.hex() for i in ids)} in swarm {manifest.run_id} ({len(set(held + ids))} in all). "
            f"Your running peer publishes it within a minute; members then refuse peers that hold it."
        )
        return
    if not 0 < days <= 3650:
        raise ConfigError(f"--days {days} must be in (0, 3650]")
    if is_author:
        token = adm.grant(key, manifest.run_id, days * 86400, invite=delegate)
    else:
        path = token_path(directory, manifest.run_id)
        if not path.exists():
            raise ConfigError(f"no join token for swarm {manifest.run_id} in {directory}")
        held_token = adm.Token.from_wire(msgpack.unpackb(path.read_bytes(), raw=False))
        if delegate:
            raise ConfigError("only the swarm's author can delegate invitations")
        try:
            token = adm.grant(held_token.signer(), manifest.run_id, days * 86400, chain=held_token.chain)
        except adm.NotAdmitted as e:
            raise ConfigError(str(e)) from None
    status = read_json(directory / "status.json")
    peers = ()
    if isinstance(status, dict) and isinstance(status.get("invite"), str):
        peers = decode_invite(status["invite"]).peers
    peers = peers or tuple(p for p in remembered.get("peers", []) if "/p2p/" in p)[:8]
    if not peers:
        raise ConfigError(f"no known address of swarm {manifest.run_id}: start your peer, then make the invite")
    text = Invite(manifest.hash, manifest.model, peers, token).encode()
    print(f"Invite to private swarm {manifest.run_id}, {token.describe()}; keep it secret:")
    print(f"  p2ptrain join --model {manifest.model} --invite {text}")
    print(f"Revoke it with: p2ptrain invite --revoke {token.grants[-1].id.hex()}")


def _read_ids(values: list[str]) -> list[bytes]:
    ids = []
    for value in values:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != 8:
            raise ConfigError(f"--revoke {value!r}: a join token id is 16 hex digits, as `p2ptrain invite` printed it")
        ids.append(raw)
    return ids
