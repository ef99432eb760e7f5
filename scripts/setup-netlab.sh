#!/usr/bin/env bash
# Install what the NAT lab (scripts/netlab.py) needs on Debian/Ubuntu: nftables (NAT routers), miniupnpd and
# miniupnpc (a home router's UPnP IGD and its client). Needs root; skips what is already there. The tests that
# build a lab skip, saying what is missing, on a machine without these (CI installs them: .ci/run).
set -euo pipefail
need=()
command -v nft >/dev/null || need+=(nftables)
command -v miniupnpd >/dev/null || need+=(miniupnpd-nftables)
command -v upnpc >/dev/null || need+=(miniupnpc)
if [ ${#need[@]} -eq 0 ]; then
  echo "setup-netlab: nftables, miniupnpd and miniupnpc are installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-netlab: need root and apt-get to install ${need[*]}; the NAT lab tests will be skipped" >&2
  exit 0
fi
echo "setup-netlab: installing ${need[*]}"
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
install || { apt-get update -q >/dev/null && install; }
