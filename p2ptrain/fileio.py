"""Atomic file writes: a reader (or a crash at any moment) sees the old file or the new one, never half.

Write to a temporary file in the same directory, fsync it, ``os.replace`` it over the target, then
fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None], mode: int = 0o644) -> None:
    """Call ``write(tmp_path)`` to produce the content, then atomically move it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode)


def read_json(path: Path) -> Any:
    """The parsed file, or None if it is missing or not JSON (callers check the shape)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
