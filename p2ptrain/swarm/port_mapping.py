"""What the home router maps to this machine (UPnP IGD, NAT-PMP), read from the router itself.

Both daemons map the peer's TCP port on a router that offers it (the Go daemon's ``-natPortMap``: UPnP or NAT-PMP;
py-libp2p's UpnpManager: UPnP; hivemind turns it on). Before it knows whether its NAT's address can be dialed, a
peer advertises only its own addresses (``nat.Role.own_addrs_only``), so the mapping does not show among them:
``find_mapping`` asks the router instead.

- UPnP IGD (most home routers): the router's table of mappings is read (miniupnpc, the library py-libp2p maps
  with); a router that does not answer discovery within a second has none.
- NAT-PMP (RFC 6886; Apple's routers, and most that run miniupnpd), on Linux: a NAT-PMP router cannot list its
  mappings, so the port is asked for: the router answers with the mapping it keeps for it (the daemon's, when it
  made it by NAT-PMP, renewed) or a new one, which expires after ``NATPMP_LIFETIME_S``. Either way the answer says
  that the router maps ports, and the peer then advertises the daemon's own mapping (``network.settle_role``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Collection
from pathlib import Path

logger = logging.getLogger(__name__)

DISCOVER_MS = 500  # how long UPnP discovery (SSDP) listens for each kind of device (it asks for 4 in turn)
MAX_ENTRIES = 256  # of the router's table read
WAIT_S = 10.0  # how long to give the daemon to map the port after joining
NATPMP_PORT = 5351
NATPMP_TRIES_S = (0.25, 0.5, 1.0)  # RFC 6886 §3.1 starts at 250 ms and doubles; three tries are enough on a LAN
NATPMP_LIFETIME_S = 120  # of a mapping this asks for (the daemon's renewals extend it)


def find_mapping(port: int, lan_ips: Collection[str], wait_s: float = WAIT_S) -> tuple[str, int] | None:
    """The router's external address and port that forward to TCP ``port`` at one of ``lan_ips``, waiting up to
    ``wait_s`` for the daemon to map it (UPnP); None if the router offers neither UPnP nor NAT-PMP."""
    found = upnp_mapping(port, set(lan_ips), wait_s)
    return found if found is not None else natpmp_mapping(port)


def upnp_mapping(port: int, lan_ips: set[str], wait_s: float) -> tuple[str, int] | None:
    try:
        import miniupnpc
    except ImportError:  # pragma: no cover - a dependency of p2ptrain (through libp2p's UPnP)
        return None
    igd = miniupnpc.UPnP()
    igd.discoverdelay = DISCOVER_MS
    try:
        if not igd.discover():
            return None
        igd.selectigd()
        external_ip = igd.externalipaddress()
    except Exception as e:  # noqa: BLE001 - miniupnpc raises bare Exceptions: no IGD, or one that does not answer
        logger.debug("No UPnP router: %s", e)
        return None
    deadline = time.monotonic() + wait_s
    while True:
        found = _mapped_port(igd, port, lan_ips)
        if found is not None:
            logger.debug("The router maps %s:%d to port %d here (UPnP)", external_ip, found, port)
            return external_ip, found
        if time.monotonic() >= deadline:
            return None
        time.sleep(1.0)


def _mapped_port(igd: object, port: int, lan_ips: set[str]) -> int | None:
    for index in range(MAX_ENTRIES):
        try:
            entry = igd.getgenericportmapping(index)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - past the last entry some routers answer with an error
            return None
        if entry is None:
            return None
        external_port, protocol, (client, internal_port) = entry[0], entry[1], entry[2]
        if protocol == "TCP" and internal_port == port and client in lan_ips:
            return int(external_port)
    return None


def natpmp_mapping(port: int, gateway: str | None = None) -> tuple[str, int] | None:
    """The mapping of TCP ``port`` on a NAT-PMP router (see the module docstring); None without an answer."""
    gateway = gateway or default_gateway()
    if gateway is None:
        return None
    # RFC 6886 §3.2: version 0, opcode 0 → external address; §3.3: opcode 2 (TCP), internal port, any external
    address = _natpmp_call(gateway, struct.pack("!BB", 0, 0), 12)
    if address is None:
        return None
    mapping = _natpmp_call(gateway, struct.pack("!BBHHHI", 0, 2, 0, port, 0, NATPMP_LIFETIME_S), 16)
    if mapping is None:
        return None
    _, op, result, _, raw_ip = struct.unpack("!BBHI4s", address)
    _, op2, result2, _, internal, external, _ = struct.unpack("!BBHIHHI", mapping)
    if (op, result, op2, result2, internal) != (128, 0, 130, 0, port) or not external:
        return None
    external_ip = str(ipaddress.IPv4Address(raw_ip))
    logger.debug("The router maps %s:%d to port %d here (NAT-PMP)", external_ip, external, port)
    return external_ip, external


def _natpmp_call(gateway: str, request: bytes, size: int) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for timeout_s in NATPMP_TRIES_S:
            sock.settimeout(timeout_s)
            try:
                sock.sendto(request, (gateway, NATPMP_PORT))
                reply, sender = sock.recvfrom(64)
            except OSError:  # a timeout, or nobody listening (ICMP port unreachable)
                continue
            if sender[0] == gateway and len(reply) >= size:
                return reply[:size]
    return None


def default_gateway(routes: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 default gateway (Linux); None where it cannot be read."""
    try:
        lines = routes.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000" and fields[2] != "00000000":
            return str(ipaddress.IPv4Address(struct.pack("<I", int(fields[2], 16))))
    return None
