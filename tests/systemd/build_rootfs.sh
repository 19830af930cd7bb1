#!/usr/bin/env bash
# Builds, once per machine, the Debian 12 root file system the systemd end-to-end test boots with
# systemd-nspawn (systemd 252 as PID 1). Cached: each test run boots a copy, so every run starts clean.
#   tests/systemd/build_rootfs.sh [DIR]     (default /var/cache/dfns-agent-ci/rootfs-bookworm)
set -euo pipefail
DIR=${1:-/var/cache/dfns-agent-ci/rootfs-bookworm}
MIRROR=${DFNS_AGENT_CI_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,python3,python3-venv,softhsm2,procps,curl,ca-certificates,sudo
[ -f "$DIR/.complete" ] && exit 0
mkdir -p "$(dirname "$DIR")"
tmp="$DIR.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$tmp" "$MIRROR" >"$tmp.log" 2>&1 || {
  tail -20 "$tmp.log" >&2; rm -f "$tmp.log"; exit 1; }
rm -f "$tmp.log"
# Nothing in the container needs the network at boot, and a getty on the console would compete for it.
rm -f "$tmp"/etc/systemd/system/getty.target.wants/* 2>/dev/null || true
echo dfns-agent-ci >"$tmp/etc/hostname"
apt_clean() { rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*; }
apt_clean
touch "$tmp/.complete"
rm -rf "$DIR"
mv "$tmp" "$DIR"
trap - EXIT
