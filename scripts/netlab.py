"""A small internet in network namespaces: public hosts on one "internet" bridge, homes behind NAT routers.

    lab = NatLab()
    s = lab.public("s")                       # a reachable host on the internet
    home = lab.home("a")                      # a home router: MASQUERADE, unsolicited inbound dropped
    a = home.host("a")                        # a PC behind it (10.0.<n>.2)
    lab.shape(20)                             # every access link 20 Mbit/s each way (tc tbf)
    subprocess.run([*a.prefix, "ping", "-c1", s.ip])
    lab.counters(home)                        # bytes the router forwarded, per remote address
    lab.remove()                              # namespaces, their processes, everything

Every namespace and link lives under names this object chose, and ``remove`` (also run at exit) deletes them
and kills the processes still running in them. The "internet" is a namespace of its own holding the bridge, so
nothing here is connected to the machine's real network: a packet to any address ends inside the lab.

Addresses. Homes use 10.0.<n>.0/24, as real home LANs do. The internet side needs addresses that the software
under test takes for public ones: go-libp2p starts hole punching only once it has a *public* observed address
(``manet.IsPublicAddr``) and its AutoNAT and relay logic skip private ones, and miniupnpd refuses to map ports on
a WAN address in any IANA special-purpose block ("Reserved / private IP address ... Port forwarding is
impossible"). With 10.x or a documentation range there, neither would try, and a test would prove nothing about
the internet. So the lab's internet is 11.77.0.0/24, ordinary public address space; the lab has no link to any
real network (the internet bridge sits in a namespace of its own, and no namespace routes out), so nothing sent
to it can leave the machine.

NAT kinds (``home(kind=...)``):
- ``cone``: MASQUERADE keeping the source port where it can (Linux's default): a port-preserving NAT with
  endpoint-dependent filtering, what most home routers do and what TCP hole punching can get through;
- ``symmetric``: MASQUERADE with ``random-fully``: every outgoing connection gets a new random port, so the
  address other peers observe is useless for a direct connection and only a relay gets through.
Both drop unsolicited inbound connections (no port forwarding) unless ``upnp=True`` starts miniupnpd on the
router, which lets hosts map a port (UPnP IGD) as a home router's UPnP does.

Distance (``region(name, rtt_ms, inside_ms)``): public hosts far from the others. A region is a namespace with a
bridge of its own, joined to the internet bridge by a long cable (``scripts/wire.py``: a user-space process that
holds every frame for half of ``rtt_ms`` each way, since netem is not available), and each of its hosts joined to
that bridge by a cable of half ``inside_ms`` round trip. Two regions of 75 ms each are 150 ms apart; hosts of one
region are ``inside_ms`` apart. Region hosts keep public addresses on the one internet subnet.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INTERNET = ipaddress.ip_network("11.77.0.0/24")
FIRST_PUBLIC = 1  # 11.77.0.1, .2, ...: public hosts and routers' WAN sides, in order of creation
TOOLS = ("ip", "tc", "nft")


def sh(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30, input=input)


def missing_tools(upnp: bool = False) -> list[str]:
    """What this machine lacks to build a lab (empty: it can). Needs root, iproute2, nftables; miniupnpd for UPnP."""
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [t for t in TOOLS if shutil.which(t) is None]
    if upnp:
        missing += [t for t in ("miniupnpd", "upnpc") if shutil.which(t) is None]
    return missing


@dataclass
class Host:
    name: str
    ns: str
    ip: str  # the address it has on its own link (a home host: its LAN address)

    @property
    def prefix(self) -> tuple[str, ...]:
        """Run a command on this host: ``[*host.prefix, "python", ...]``."""
        return ("ip", "netns", "exec", self.ns)

    def wrap(self, binary: str | Path, directory: Path, env: dict[str, str] | None = None) -> Path:
        """An executable in ``directory`` that runs ``binary`` (with the arguments it is given) on this host: for a
        program that starts a binary by path, such as hivemind starting its p2p daemon."""
        path = Path(directory) / f"{Path(binary).name}-on-{self.name}"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        path.write_text(f'#!/bin/sh\n{exports}exec ip netns exec {self.ns} {shlex.quote(str(binary))} "$@"\n')
        path.chmod(0o755)
        return path


@dataclass
class Home:
    """A NAT router (its own namespace) and the hosts behind it."""

    lab: NatLab
    name: str
    router: Host  # router.ip: its public (WAN) address
    index: int
    kind: str
    upnp: bool
    hosts: list[Host] = field(default_factory=list)
    miniupnpd: subprocess.Popen | None = None

    @property
    def lan(self) -> str:
        return f"10.0.{self.index}"

    def host(self, name: str) -> Host:
        """A PC behind this router, 10.0.<index>.<2 + n>/24, default route through the router."""
        ip = f"{self.lan}.{2 + len(self.hosts)}"
        host = Host(name, self.lab._ns(name), ip)
        self.lab._namespace(host.ns)
        link = self.lab._link(self.router.ns, f"l{len(self.hosts)}", host.ns, "eth0")
        sh("ip", "-n", self.router.ns, "link", "set", link, "master", "lan")
        sh("ip", "-n", host.ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", host.ns, "route", "add", "default", "via", f"{self.lan}.1")
        self.hosts.append(host)
        return host


@dataclass
class Region:
    """Public hosts far from the rest of the internet (see the module docstring): ``rtt_ms`` from the region's
    bridge to the internet bridge, ``inside_ms`` between two of its hosts (round trips)."""

    lab: NatLab
    name: str
    ns: str
    rtt_ms: float
    inside_ms: float
    hosts: list[Host] = field(default_factory=list)

    def host(self, name: str) -> Host:
        host = Host(name, self.lab._ns(name), self.lab._public_ip())
        self.lab._namespace(host.ns)
        far = f"h{len(self.hosts)}"
        self.lab._link(host.ns, "eth0", self.ns, far)
        sh("ip", "-n", host.ns, "addr", "add", f"{host.ip}/{INTERNET.prefixlen}", "dev", "eth0")
        if self.inside_ms > 0:
            port = self.lab._link(self.ns, f"{far}w", self.ns, f"{far}b")
            self.lab._wire(self.ns, far, port, self.inside_ms / 2)  # two hosts: inside_ms apart
            sh("ip", "-n", self.ns, "link", "set", f"{far}b", "master", "rbr")
        else:
            sh("ip", "-n", self.ns, "link", "set", far, "master", "rbr")
        self.lab._access += [(host.ns, "eth0"), (self.ns, far)]
        self.hosts.append(host)
        return host


class DhtNode:
    """A plain hivemind DHT node (``hivemind-dht``) on a host, as a researcher runs to bootstrap a swarm; its
    identity is made here so that its address is known before it starts. ``stop`` kills it with its p2p daemon."""

    def __init__(self, host: Host, workdir: Path, initial: list[str], port: int = 31337):
        import sys

        from hivemind.p2p import P2P, PeerID

        key = Path(workdir) / f"{host.name}.key"
        P2P.generate_identity(str(key))
        self.maddr = f"/ip4/{host.ip}/tcp/{port}/p2p/{PeerID.from_identity(key.read_bytes()).to_base58()}"
        command = [str(Path(sys.executable).with_name("hivemind-dht")), "--host_maddrs", f"/ip4/0.0.0.0/tcp/{port}"]
        command += ["--identity_path", str(key), *(["--initial_peers", *initial] if initial else [])]
        with open(Path(workdir) / f"{host.name}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [*host.prefix, *command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


class NatLab:
    def __init__(self, tag: str | None = None):
        self.tag = tag or f"{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.public_hosts: list[Host] = []
        self.homes: list[Home] = []
        self.regions: list[Region] = []
        self._wires: list[subprocess.Popen] = []
        self._next_ip = FIRST_PUBLIC
        self._links = 0
        self._access: list[tuple[str, str]] = []  # (namespace, device): both ends of every link to the internet
        self._workdir = Path(tempfile.mkdtemp(prefix=f"p2pt-lab-{self.tag}-"))
        atexit.register(self.remove)
        try:
            self.internet = self._ns("inet")
            self._namespace(self.internet)
            sh("ip", "-n", self.internet, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.internet, "link", "set", "br0", "up")
        except BaseException:
            self.remove()
            raise

    # -- building ------------------------------------------------------------------------------------------
    def _ns(self, name: str) -> str:
        return f"p2pt{self.tag}-{name}"

    def _namespace(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _link(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> str:
        """A veth pair between two namespaces, both ends up; returns ``dev_a``."""
        tmp = f"p2pv{self.tag}{self._links}"
        self._links += 1
        sh("ip", "link", "add", f"{tmp}a", "type", "veth", "peer", "name", f"{tmp}b")
        for tmp_dev, ns, dev in ((f"{tmp}a", ns_a, dev_a), (f"{tmp}b", ns_b, dev_b)):
            sh("ip", "link", "set", tmp_dev, "netns", ns)
            sh("ip", "-n", ns, "link", "set", tmp_dev, "name", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        return dev_a

    def _wire(self, ns: str, dev_a: str, dev_b: str, rtt_ms: float) -> None:
        """A user-space cable (``scripts/wire.py``) between two interfaces of ``ns``: ``rtt_ms`` there and back.
        It runs in ``ns``, so ``remove`` stops it with the namespace's other processes."""
        import sys

        wire = Path(__file__).with_name("wire.py")
        pair = f"{dev_a}:{dev_b}:{rtt_ms / 2}"
        self._wires.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(wire), "--pair", pair]))

    def region(self, name: str, rtt_ms: float, inside_ms: float = 0.0) -> Region:
        """Public hosts ``rtt_ms`` (round trip) away from the internet bridge, ``inside_ms`` from each other's
        bridge: see the module docstring."""
        region = Region(self, name, self._ns(f"{name}-rg"), rtt_ms, inside_ms)
        self._namespace(region.ns)
        sh("ip", "-n", region.ns, "link", "add", "rbr", "type", "bridge")
        sh("ip", "-n", region.ns, "link", "set", "rbr", "up")
        core = self._link(self.internet, f"g{len(self.regions)}", region.ns, "core")
        sh("ip", "-n", self.internet, "link", "set", core, "master", "br0")
        self._link(region.ns, "inner", region.ns, "rbrp")
        sh("ip", "-n", region.ns, "link", "set", "rbrp", "master", "rbr")
        self._wire(region.ns, "core", "inner", rtt_ms)
        self.regions.append(region)
        return region

    def _public_ip(self) -> str:
        ip = INTERNET.network_address + self._next_ip
        if ip not in INTERNET or ip == INTERNET.broadcast_address:
            raise ValueError("the lab's internet is full")
        self._next_ip += 1
        return str(ip)

    def _plug_into_internet(self, ns: str, dev: str) -> str:
        """Connect ``ns`` to the internet bridge by a link named ``dev``; returns the address it got."""
        ip = self._public_ip()
        port = self._link(self.internet, f"p{self._next_ip}", ns, dev)
        sh("ip", "-n", self.internet, "link", "set", port, "master", "br0")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/{INTERNET.prefixlen}", "dev", dev)
        self._access += [(ns, dev), (self.internet, port)]
        return ip

    def public(self, name: str) -> Host:
        """A host with a public address (a seeder, a lab's server): reachable by anyone on the internet."""
        host = Host(name, self._ns(name), "")
        self._namespace(host.ns)
        host.ip = self._plug_into_internet(host.ns, "eth0")
        self.public_hosts.append(host)
        return host

    def home(self, name: str, kind: str = "cone", upnp: bool = False) -> Home:
        """A home network behind its own NAT router (see the module docstring for ``kind``)."""
        if kind not in ("cone", "symmetric"):
            raise ValueError(f"kind must be cone or symmetric, got {kind!r}")
        index = len(self.homes) + 1
        router = Host(f"{name}-router", self._ns(f"{name}-rt"), "")
        self._namespace(router.ns)
        router.ip = self._plug_into_internet(router.ns, "wan")
        sh("ip", "-n", router.ns, "link", "add", "lan", "type", "bridge")
        sh("ip", "-n", router.ns, "addr", "add", f"10.0.{index}.1/24", "dev", "lan")
        sh("ip", "-n", router.ns, "link", "set", "lan", "up")
        sh("ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        home = Home(self, name, router, index, kind, upnp)
        sh("ip", "netns", "exec", router.ns, "nft", "-f", "-", input=self._router_rules(home))
        if upnp:
            self._start_miniupnpd(home)
        self.homes.append(home)
        return home

    def _router_rules(self, home: Home) -> str:
        """NAT and firewall of a home router. Per remote host on the internet, a counter of the bytes it forwards
        (``counters``): they tell direct traffic between two homes from traffic through a public relay."""
        masquerade = "masquerade random,fully-random" if home.kind == "symmetric" else "masquerade"
        counters = "\n".join(f"    ip saddr {ip} counter\n    ip daddr {ip} counter" for ip in self._all_internet_ips())
        upnp = (
            """
table inet miniupnpd {
  chain miniupnpd {
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "wan" jump prerouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting {
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd
  }
  chain postrouting_miniupnpd {
  }
}
"""
            if home.upnp
            else ""
        )
        return (
            upnp
            + f"""
table ip lab {{
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
    ct status dnat accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state new drop  # silently, as home routers do: a reset would end a hole-punching attempt
  }}
  chain count {{
    type filter hook forward priority filter - 1; policy accept;
{counters}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {masquerade}
  }}
}}
"""
        )

    def _all_internet_ips(self) -> list[str]:
        return [str(INTERNET.network_address + n) for n in range(FIRST_PUBLIC, INTERNET.num_addresses - 1)]

    def _start_miniupnpd(self, home: Home) -> None:
        """miniupnpd on the router: hosts on the LAN map ports on the WAN address (UPnP IGD, NAT-PMP, PCP)."""
        conf = self._workdir / f"{home.name}-miniupnpd.conf"
        conf.write_text(
            "\n".join(
                [
                    "ext_ifname=wan",
                    "listening_ip=lan",
                    "port=0",  # any free port for its HTTP side; SSDP multicast finds it
                    "enable_natpmp=yes",
                    "enable_upnp=yes",
                    "secure_mode=yes",  # a host may map ports only to itself
                    "system_uptime=yes",
                    f"uuid=3b1f0c9e-0000-4000-8000-00000000{home.index:04d}",
                    "ext_perform_stun=no",
                    "upnp_table_name=miniupnpd",  # the chains _router_rules made for it
                    "upnp_nat_table_name=miniupnpd",
                    "upnp_forward_chain=miniupnpd",
                    "upnp_nat_chain=prerouting_miniupnpd",
                    "upnp_nat_postrouting_chain=postrouting_miniupnpd",
                    f"allow 1024-65535 {home.lan}.0/24 1024-65535",
                    "deny 0-65535 0.0.0.0/0 0-65535",
                    "",
                ]
            )
        )
        # multicast (SSDP) on the LAN bridge
        sh("ip", "-n", home.router.ns, "route", "add", "239.0.0.0/8", "dev", "lan")
        home.miniupnpd = subprocess.Popen(
            [*home.router.prefix, "miniupnpd", "-d", "-f", str(conf), "-P", str(self._workdir / f"{home.name}.pid")],
            stdout=subprocess.DEVNULL,
            stderr=open(self._workdir / f"{home.name}-miniupnpd.log", "wb"),  # noqa: SIM115 - the process owns it
            start_new_session=True,
        )
        time.sleep(0.3)
        if home.miniupnpd.poll() is not None:
            log = (self._workdir / f"{home.name}-miniupnpd.log").read_text(errors="replace")
            raise RuntimeError(f"miniupnpd did not start on {home.name}'s router:\n{log[-2000:]}")

    # -- using ---------------------------------------------------------------------------------------------
    def shape(self, mbit: float, burst_bytes: int | None = None) -> None:
        """Every link to the internet (public hosts, home routers' WAN sides) at ``mbit`` in each direction; home
        LANs stay unshaped, as a home's uplink is its bottleneck."""
        burst = burst_bytes or max(32 * 1024, int(mbit * 1e6 / 8 / 50))
        tbf = ("tbf", "rate", f"{mbit:.3f}mbit", "burst", str(burst), "latency", "400ms")
        for ns, dev in self._access:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)

    def counters(self, home: Home) -> dict[str, int]:
        """Bytes ``home``'s router forwarded to or from each internet address (both directions summed)."""
        out = sh("ip", "netns", "exec", home.router.ns, "nft", "list", "chain", "ip", "lab", "count").stdout
        total: dict[str, int] = {}
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 7 and words[0] == "ip" and words[1] in ("saddr", "daddr") and "bytes" in words:
                ip, count = words[2], int(words[words.index("bytes") + 1])
                total[ip] = total.get(ip, 0) + count
        return total

    def pids(self, ns: str) -> list[int]:
        out = sh("ip", "netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split()]

    def remove(self) -> None:
        """Kill what runs in the lab, delete its namespaces (their links go with them). Safe to call twice."""
        for home in self.homes:
            if home.miniupnpd is not None and home.miniupnpd.poll() is None:
                home.miniupnpd.terminate()
                try:
                    home.miniupnpd.wait(3)
                except subprocess.TimeoutExpired:
                    home.miniupnpd.kill()
        for wire in self._wires:
            wire.terminate()
        for wire in self._wires:
            try:
                wire.wait(3)
            except subprocess.TimeoutExpired:
                wire.kill()
        self._wires.clear()
        for ns in reversed(self.namespaces):
            for pid in self.pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        shutil.rmtree(self._workdir, ignore_errors=True)
