"""p2ptrain's exceptions and the exit codes they become at the CLI boundary.

Every error a user can cause or fix is a ``P2PTrainError`` subclass whose message says what is
wrong and what to do next; ``cli.main`` maps it to its ``exit_code``. Anything else is a bug and
exits with ``ExitCode.INTERNAL`` (traceback with ``--debug``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: please report it with the --debug output
    USAGE = 2  # bad flag or value (also click's own usage errors)
    DATA = 3  # dataset or tokenizer unreadable
    MANIFEST = 4  # swarm manifest or invite invalid (bad signature, hash mismatch, corrupt)
    NETWORK = 5  # no peer reachable, port in use
    CHECKPOINT = 6  # local checkpoint unreadable
    INTERRUPTED = 130  # Ctrl+C, like a shell


class P2PTrainError(Exception):
    """Base of every error that a user can act on. The message is shown as-is."""

    exit_code = ExitCode.INTERNAL


class ConfigError(P2PTrainError):
    """A setting, flag or name is invalid (unknown model, bad value)."""

    exit_code = ExitCode.USAGE


class DatasetError(P2PTrainError):
    """The dataset or tokenizer cannot be read."""

    exit_code = ExitCode.DATA


class ManifestInvalid(P2PTrainError):
    """A swarm manifest failed to decode, or its hash or signature does not match."""

    exit_code = ExitCode.MANIFEST


class InviteInvalid(P2PTrainError):
    """An invite string is malformed, truncated or of an unknown version."""

    exit_code = ExitCode.MANIFEST


class PeerUnreachable(P2PTrainError):
    """None of the given peers answered, or the swarm could not be found through them."""

    exit_code = ExitCode.NETWORK


class PortInUse(P2PTrainError):
    """The listen port is taken by another program."""

    exit_code = ExitCode.NETWORK


class CheckpointError(P2PTrainError):
    """The local checkpoint exists but cannot be read."""

    exit_code = ExitCode.CHECKPOINT


class LedgerInvalid(P2PTrainError):
    """An energy ledger (a file or a DHT record) is malformed, forged, or its numbers are impossible."""

    exit_code = ExitCode.CHECKPOINT  # like a checkpoint, it is this peer's saved state
