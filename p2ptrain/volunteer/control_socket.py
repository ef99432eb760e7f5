"""The running daemon's local control endpoint: `p2ptrain status | pause | resume | leave | daemon stop`.

A unix socket, ``<data dir>/daemon.sock``: the data dir is 0700 and the socket 0600, so only the
user who runs the daemon can connect; on Linux the daemon also checks the caller's uid
(``SO_PEERCRED``) and refuses anyone else (root included), should the file modes ever be loosened.
Nothing listens on the network.

Protocol: one JSON object per line each way, at most ``MAX_MESSAGE`` bytes; a request
``{"command": "status" | "pause" | "resume" | "leave" | "stop", "reason": "…"}`` gets
``{"ok": true, …}`` or ``{"ok": false, "error": "…"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2ptrain.errors import P2PTrainError

logger = logging.getLogger(__name__)
MAX_MESSAGE = 64 * 1024
COMMANDS = ("status", "pause", "resume", "leave", "stop")
SOCKET_NAME = "daemon.sock"
_MAX_UNIX_PATH = 100  # sun_path is 104-108 bytes depending on the OS


class DaemonNotRunning(P2PTrainError):
    """No daemon answers on this data dir's control socket."""


def socket_path(data_dir: Path) -> Path:
    path = data_dir / SOCKET_NAME
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise P2PTrainError(f"the data dir path is too long for a control socket: {data_dir} (use a shorter one)")
    return path


class ControlServer:
    """Serves requests with ``handle(request) -> reply`` on a background thread until ``close``."""

    def __init__(self, data_dir: Path, handle: Callable[[dict[str, Any]], dict[str, Any]]):
        self.path, self._handle = socket_path(data_dir), handle
        self.path.unlink(missing_ok=True)  # a socket left by a crashed daemon (the data dir lock says we own it)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window where another user could connect
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(8)
        self._sock.settimeout(0.5)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    reply = self._answer(conn)
                except Exception as e:  # noqa: BLE001 - a bad client gets an error, the daemon goes on
                    logger.warning("Control request failed: %r", e)
                    reply = {"ok": False, "error": f"internal error: {e}"}
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                    # read what the client sent until it closes: closing with its request unread (a refused
                    # client's) would reset the connection, and the client could lose the reply
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(4096):
                        pass

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            logger.warning("Refused a control request from uid %d (the daemon runs as uid %d)", uid, os.getuid())
            return {"ok": False, "error": "refused: the daemon belongs to another user"}
        try:
            request = json.loads(_read_line(conn))
        except (ValueError, OSError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        if not isinstance(request, dict) or request.get("command") not in COMMANDS:
            return {"ok": False, "error": f"unknown command; known: {', '.join(COMMANDS)}"}
        reason = request.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 200:
            return {"ok": False, "error": "reason must be a string of at most 200 characters"}
        return self._handle(request)

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self._thread.join(2.0)
        self.path.unlink(missing_ok=True)


def request(data_dir: Path, command: str, timeout_s: float = 10.0, **fields: Any) -> dict[str, Any]:
    """Send one command to the daemon of ``data_dir``; its reply.

    Raises:
        DaemonNotRunning: nothing listens on the socket.
        P2PTrainError: the daemon answered with an error.
    """
    path = socket_path(data_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"no daemon is running for {data_dir} (start one: p2ptrain daemon start)") from None
        except PermissionError:
            raise P2PTrainError(f"{path}: permission denied (the daemon belongs to another user)") from None
        sock.sendall(json.dumps({"command": command, **fields}).encode() + b"\n")
        reply = json.loads(_read_line(sock))
    if not isinstance(reply, dict):
        raise P2PTrainError("the daemon sent a malformed reply")
    if not reply.get("ok"):
        raise P2PTrainError(f"the daemon refused: {reply.get('error', '?')}")
    return reply


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message over {MAX_MESSAGE} bytes")
    return data


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid (Linux ``SO_PEERCRED``); None where the OS does not say."""
    if not sys.platform.startswith("linux"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid
