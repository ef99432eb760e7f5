"""port_mapping.py against a real router: miniupnpd (UPnP IGD and NAT-PMP) on a home router of the NAT lab
(scripts/netlab.py). Each call runs in the home host's namespace: nothing here reaches this machine's own network."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from netlab import Host, NatLab, missing_tools  # noqa: E402

pytestmark = pytest.mark.skipif(bool(missing_tools(upnp=True)), reason=f"needs {', '.join(missing_tools(upnp=True))}")


def on(host: Host, call: str):
    """``call`` evaluated in a process on ``host``, with ``port_mapping`` as ``m`` (and ``t``: when it began)."""
    code = f"import time; from p2ptrain.swarm import port_mapping as m; t = time.monotonic(); print(repr({call}))"
    out = subprocess.run([*host.prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip())


def find_mapping_on(host: Host, port: int, wait_s: float) -> tuple[str, int] | None:
    return on(host, f"m.find_mapping({port}, {{{host.ip!r}}}, {wait_s})")


@pytest.fixture
def lab():
    lab = NatLab()
    try:
        yield lab
    finally:
        lab.remove()


def test_the_mapping_a_host_made_is_read_back_from_its_router(lab):
    home = lab.home("u", upnp=True)
    u = home.host("u")
    assert on(u, f"m.upnp_mapping(31337, {{{u.ip!r}}}, 0)") is None  # nothing mapped yet
    add = [*u.prefix, "upnpc", "-e", "p2ptrain test", "-a", u.ip, "31337", "40123", "TCP"]
    subprocess.run(add, capture_output=True, text=True, timeout=30, check=True)
    assert find_mapping_on(u, 31337, wait_s=0) == (home.router.ip, 40123)
    assert on(u, f"m.upnp_mapping(31338, {{{u.ip!r}}}, 0)") is None  # another port


def test_a_nat_pmp_router_maps_the_port_and_keeps_one_mapping_for_it(lab):
    home = lab.home("u", upnp=True)  # miniupnpd speaks NAT-PMP too
    u = home.host("u")
    assert on(u, "m.default_gateway()") == f"{home.lan}.1"
    ip, external = on(u, "m.natpmp_mapping(31337)")
    assert ip == home.router.ip and external
    assert on(u, "m.natpmp_mapping(31337)") == (ip, external)  # the one it keeps, renewed
    rules = subprocess.run([*home.router.prefix, "nft", "list", "table", "inet", "miniupnpd"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert f"dnat ip to {u.ip}:31337" in rules, rules


def test_a_router_without_upnp_or_nat_pmp_is_passed_over_at_once(lab):
    n = lab.home("n").host("n")
    found, took_s = on(n, f"(m.find_mapping(31337, {{{n.ip!r}}}, 10), time.monotonic() - t)")
    assert found is None
    assert took_s < 9  # UPnP discovery and 1.75 s of NAT-PMP tries, not the 10 s wait for a mapping
