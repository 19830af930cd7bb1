#!/usr/bin/env bash
# Sets up everything dfns-agent needs on a Debian/Ubuntu machine, idempotently:
#   - apt packages (SoftHSM 2, Python venv support, OpenSSH's ssh-agent, gcc and p11-kit's pkcs11.h for the
#     benchmark) when missing;
#   - a virtualenv in .venv with the agent and its test tools;
#   - a project-local SoftHSM token directory in .dev/ (config from pkcs11_config/), a dev token
#     "dfns-dev" with a random PIN in .dev/pin (mode 0600), an Ed25519 key "dfns-dev-ed25519" on it,
#     and an agent config .dev/agent.toml that uses them.
#
# Usage:
#   ./softhsm_setup.sh          set up only
#   ./softhsm_setup.sh serve    set up, then run the agent on the dev token (Ctrl-C stops it)
#   ./softhsm_setup.sh test     set up, then run the checks and the test suite (extra args go to pytest)
#   ./softhsm_setup.sh dev-dfns set up, then run a local Dfns-compatible API on 127.0.0.1:8400 that knows
#                               the dev key, so `dfns-agent request …` works without a Dfns account
#   ./softhsm_setup.sh --help   print the usage and do nothing else (also -h)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
DEV="$ROOT/.dev"
VENV="$ROOT/.venv"
KEY_LABEL="dfns-dev-ed25519"

say() { printf '==> %s\n' "$*" >&2; }

usage() {
  cat <<EOF
usage: $0 [setup|serve|dev-dfns|test [pytest args]]

Installs what is missing (apt: softhsm2, python3-venv, openssh-client, gcc, libp11-kit-dev; .venv with
the agent), makes the SoftHSM dev token in .dev/ (PIN in .dev/pin, config .dev/agent.toml), then:
  setup       (the default) stops there
  serve       runs the agent on the dev token (Ctrl-C stops it); extra args go to dfns-agent serve
  dev-dfns    runs a local Dfns-compatible API on 127.0.0.1:8400 that knows the dev key
  test        runs ruff (lint and format), mypy, lint-imports and pytest (extra args go to pytest)
  -h, --help  prints this and does nothing else
EOF
}

# Before any work: --help only prints, and a mistyped command does not run the whole setup first.
case "${1:-setup}" in
  -h|--help|help) usage; exit 0 ;;
  setup|serve|dev-dfns|test) ;;
  *) usage >&2; exit 2 ;;
esac

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root for: $*  (run as root or install sudo)"; exit 1
  fi
}

# Another apt (unattended-upgrades, just after a fresh machine boots) holds dpkg's lock for minutes: wait for
# it rather than fail at once with "Could not get lock" (apt 1.9.11 and later; older ones ignore the option).
APT_WAIT=(-o DPkg::Lock::Timeout=600)

# Whether apt can install package $1 on this release (after apt-get update).
installable() {
  local candidate
  candidate=$(apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" {print $2}')
  [ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}

install_packages() {
  local want=() optional=()
  # softhsm2 brings softhsm2-util and the module (libsofthsm2); the module is looked for once the venv exists
  command -v softhsm2-util >/dev/null || want+=(softhsm2)
  python3 -c 'import ensurepip, venv' 2>/dev/null || want+=(python3-venv)
  command -v python3 >/dev/null || want+=(python3)
  # the benchmark (and its test) compares the agent with OpenSSH's ssh-agent
  command -v ssh-agent >/dev/null && command -v ssh-add >/dev/null || want+=(openssh-client)
  # the benchmark's slow-HSM filter module (bench/slowhsm.c) is built with gcc against p11-kit's pkcs11.h
  command -v cc >/dev/null || want+=(gcc libc6-dev)
  [ -f /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || want+=(libp11-kit-dev)
  # the module contract suite (tests/modules): p11-kit remoting, opencryptoki's soft token, tpm2-pkcs11 on swtpm.
  # Installed where this release has them: the suite skips a module whose packages are missing, and says so.
  local pkg
  for pkg in p11-kit p11-kit-modules opencryptoki libtpm2-pkcs11-1 libtpm2-pkcs11-tools swtpm swtpm-tools tpm2-tools \
    tpm2-abrmd libtss2-tcti-tabrmd0; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || optional+=("$pkg")
  done
  # dbus-daemon: its own package since dbus 1.14 (Debian 12, Ubuntu 24.04), part of "dbus" before (Ubuntu 22.04)
  command -v dbus-daemon >/dev/null || optional+=("dbus-daemon|dbus")
  # the systemd end-to-end test (tests/systemd) boots a Debian 12 rootfs with systemd-nspawn
  command -v systemd-nspawn >/dev/null || want+=(systemd-container)
  command -v debootstrap >/dev/null || want+=(debootstrap)
  if [ ${#want[@]} -gt 0 ] || [ ${#optional[@]} -gt 0 ]; then
    as_root apt-get "${APT_WAIT[@]}" update -qq
    local choice
    for pkg in "${optional[@]}"; do
      for choice in ${pkg//|/ }; do
        if installable "$choice"; then want+=("$choice"); continue 2; fi
      done
      say "${pkg//|/ or } is not in this release's archive: the module tests that need it will be skipped"
    done
  fi
  if [ ${#want[@]} -gt 0 ]; then
    say "installing ${want[*]} (apt)"
    # env inside as_root: sudo resets the environment, and without it a debconf question would wait, unseen
    as_root env DEBIAN_FRONTEND=noninteractive apt-get "${APT_WAIT[@]}" install -y -qq --no-install-recommends \
      "${want[@]}" >/dev/null
  fi
}

setup_venv() {
  local stamp="$VENV/.installed" want
  want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  say "creating $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  echo "$want" >"$stamp"
}

# The token, its PIN files, the key and .dev/agent.toml: agent/dev/softhsm.py, the one SoftHSM bootstrap of
# the repository (the tests and the benchmark make their tokens with it too).
setup_dev_token() {
  local module
  module=$("$VENV/bin/python" -m agent.dev.softhsm module) || { say "libsofthsm2.so not found after install"; exit 1; }
  "$VENV/bin/python" -m agent.dev.softhsm dev-token "$DEV" >/dev/null
  export SOFTHSM2_CONF="$DEV/softhsm2.conf"
  export SOFTHSM_MODULE="$module"
}

# One setup at a time: `serve` and `dev-dfns` started together on a fresh machine would otherwise race on
# apt's lock and pip-install into one venv at once. Released (fd 9 closed) before the command runs, so a
# running agent does not hold it.
mkdir -p "$DEV"
exec 9>"$DEV/.setup.lock"
if ! flock -n 9; then
  say "waiting for another ./softhsm_setup.sh to finish setting up"
  flock 9
fi
install_packages
setup_venv
setup_dev_token
exec 9>&-

case "${1:-setup}" in
  setup)
    say "ready: $VENV/bin/dfns-agent --config $DEV/agent.toml serve" ;;
  serve)
    shift
    exec "$VENV/bin/dfns-agent" --config "$DEV/agent.toml" serve "$@" ;;
  dev-dfns)
    shift
    "$VENV/bin/dfns-agent" --config "$DEV/agent.toml" keys public --label "$KEY_LABEL" >"$DEV/dfns/dev.pem"
    exec "$VENV/bin/dfns-agent" dev-dfns --service-account "dev=$DEV/dfns/dev.pem" --tokens-dir "$DEV/dfns" "$@" ;;
  test)
    shift
    say "ruff"
    "$VENV/bin/ruff" check agent tests bench
    "$VENV/bin/ruff" format --check --quiet agent tests bench
    say "mypy"
    "$VENV/bin/mypy" --no-error-summary
    say "import rule (.importlinter)"
    "$VENV/bin/lint-imports" --no-cache
    say "pytest"
    exec "$VENV/bin/python" -m pytest "$@" ;;
esac
