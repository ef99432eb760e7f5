"""The daemon's command line: the Go-style flags hivemind gives its bundled ``p2pd`` (``-name=value``).

``p2ptrain-p2pd`` accepts every flag hivemind 1.1 passes, so it can stand in for that binary file for file.
Flags that configure Go-only machinery (TLS, QUIC tuning, AutoNAT, the connection manager, relay discovery) are
accepted and ignored: the py-libp2p stack here is TCP + Noise + yamux (see
protocols/p2pd.md). A flag nobody knows is an error, as it is for the Go daemon.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_MSG_SIZE = 4 * 1024 * 1024

# Go's flags that hivemind may pass and that mean nothing for this stack (the value is still parsed).
IGNORED = {
    "autonat", "connManager", "connLo", "connHi", "connGrace",
    "relayHopLimit", "relayDiscovery", "relayActive", "relayHop", "tls", "noise",
    "forceReachabilityPublic", "pubsub", "pubsubRouter", "quic", "metricsAddr",
    "dhtClient", "dht", "pubsubSign", "pubsubSignStrict", "gossipsubHeartbeatInterval",
    "gossipsubHeartbeatInitialDelay", "relayService", "relayMaxCircuits", "relayMaxReservations", "relayBufferSize",
    "relayDataLimit", "relayTimeLimit", "pprof", "pprofPort", "muxer", "bandwidthMetrics",
}  # fmt: skip
KNOWN = IGNORED | {
    "listen", "hostAddrs", "announceAddrs", "noListenAddrs", "bootstrapPeers", "b", "bootstrap", "id",
    "idleTimeout", "persistentConnMaxMsgSize", "dhtServer", "mdns", "q", "natPortMap",
    "relay", "autoRelay", "forceReachabilityPrivate", "trustedRelays",
}  # fmt: skip


class FlagError(ValueError):
    pass


@dataclass(frozen=True)
class Options:
    control: str = "/unix/tmp/p2pd.sock"  # -listen: the control socket's multiaddr
    host_addrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)  # -hostAddrs
    announce_addrs: tuple[str, ...] = ()  # -announceAddrs
    no_listen: bool = False  # -noListenAddrs
    bootstrap_peers: tuple[str, ...] = ()  # -bootstrapPeers
    bootstrap: bool = False  # -b
    identity: str | None = None  # -id: a private key file (libp2p's protobuf PrivateKey)
    idle_timeout_s: float = 0.0  # -idleTimeout: exit after this long with no client; 0 = never
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE  # -persistentConnMaxMsgSize
    dht_server: bool = False  # -dhtServer: answer Kademlia queries (else client mode)
    mdns: bool = False  # -mdns: find peers on the LAN (an extension: Go's p2pd has no such flag)
    nat_port_map: bool = False  # -natPortMap: map the listening port on the router (UPnP IGD), advertise it
    relay: bool = False  # -relay: circuit relay v2 (p2pd/relay.py): relay for others unless forced private
    auto_relay: bool = False  # -autoRelay: hold slots on the -trustedRelays
    force_private: bool = False  # -forceReachabilityPrivate: behind NAT (p2ptrain found out)
    trusted_relays: tuple[str, ...] = ()  # -trustedRelays
    quiet: bool = False  # -q: no startup lines besides the ones hivemind needs


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration for the forms in use: "30s", "1m30s", "500ms", "0"."""
    if text in ("0", ""):
        return 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise FlagError(f"invalid duration {text!r} (expected e.g. 30s, 1m30s, 500ms)")
    return sum(float(n) * units[u] for n, u in parts)


def _bool(name: str, text: str | None) -> bool:
    if text is None:
        return True
    lowered = text.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    raise FlagError(f"-{name} expects a boolean, got {text!r}")


def _addrs(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def parse(argv: list[str]) -> Options:
    values: dict[str, str | None] = {}
    for arg in argv:
        match = re.fullmatch(r"--?([A-Za-z][A-Za-z0-9]*)(?:=(.*))?", arg, flags=re.S)
        if not match:
            raise FlagError(f"unexpected argument {arg!r} (flags look like -name=value)")
        name, value = match.group(1), match.group(2)
        if name not in KNOWN:
            raise FlagError(f"flag provided but not defined: -{name}")
        values[name] = value

    def text(name: str) -> str:
        value = values[name]
        if value is None:
            raise FlagError(f"-{name} needs a value: -{name}=…")
        return value

    options: dict[str, object] = {}
    if "listen" in values:
        options["control"] = text("listen")
    if "hostAddrs" in values:
        options["host_addrs"] = _addrs(text("hostAddrs"))
    if "announceAddrs" in values:
        options["announce_addrs"] = _addrs(text("announceAddrs"))
    if "bootstrapPeers" in values:
        options["bootstrap_peers"] = _addrs(text("bootstrapPeers"))
    if "trustedRelays" in values:
        options["trusted_relays"] = _addrs(text("trustedRelays"))
    if "id" in values:
        options["identity"] = text("id")
    if "idleTimeout" in values:
        options["idle_timeout_s"] = parse_duration(text("idleTimeout"))
    if "persistentConnMaxMsgSize" in values:
        try:
            options["max_msg_size"] = int(text("persistentConnMaxMsgSize"))
        except ValueError as e:
            raise FlagError("-persistentConnMaxMsgSize expects a number of bytes") from e
        if not 1024 <= options["max_msg_size"] <= 256 * 1024 * 1024:
            raise FlagError("-persistentConnMaxMsgSize must be in 1 KiB - 256 MiB")
    for flag, field in [
        ("noListenAddrs", "no_listen"),
        ("b", "bootstrap"),
        ("bootstrap", "bootstrap"),
        ("dhtServer", "dht_server"),
        ("mdns", "mdns"),
        ("natPortMap", "nat_port_map"),
        ("relay", "relay"),
        ("autoRelay", "auto_relay"),
        ("forceReachabilityPrivate", "force_private"),
        ("q", "quiet"),
    ]:
        if flag in values:
            options[field] = _bool(flag, values[flag])
    if not str(options.get("control", Options.control)).startswith("/unix/"):
        raise FlagError("-listen must be a unix socket multiaddr (/unix/PATH)")
    return Options(**options)  # type: ignore[arg-type]
