#!/usr/bin/env bash
# Install the Debian/Ubuntu packages the tests use: for the NAT lab (scripts/netlab.py) nftables (NAT routers),
# miniupnpd and miniupnpc (a home router's UPnP IGD and its client); for the dashboard's pages a headless browser
# (chromium, driven by Playwright from the test extras). Needs root; skips what is already there. The tests that
# need them skip, saying what is missing, on a machine without these (CI installs them: .ci/run).
set -euo pipefail
need=()
command -v nft >/dev/null || need+=(nftables)
command -v miniupnpd >/dev/null || need+=(miniupnpd-nftables)
command -v upnpc >/dev/null || need+=(miniupnpc)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
  echo "setup-system: nftables, miniupnpd, miniupnpc and chromium are installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup-system: need root and apt-get to install ${need[*]}; the NAT lab and browser tests will be skipped" >&2
  exit 0
fi
echo "setup-system: installing ${need[*]}"
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
install || { apt-get update -q >/dev/null && install; }
