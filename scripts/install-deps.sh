#!/usr/bin/env bash
# Install the Debian packages that nfqlb's tests and demo need, and only the missing ones.
#
#   runtime:  iptables (NFQUEUE rules), nftables (nft: the headers route's table, daemon.bulk),
#             libnetfilter-queue-dev (NetfilterQueue builds against it)
#   lab:      iproute2 (ip netns, veth, bridge), nginx-light, curl, socat, procps (sysctl),
#             bird2 (the BGP router of the ECMP lab, tests/lab/ecmp.py; not started as a service)
#   build:    gcc, libc6-dev, and for $PYTHON its headers (python3-dev) and venv (python3-venv)
#             when that Python is Debian's own and lacks them
#
# Idempotent and quiet when everything is there; runs `apt-get update` once, only when
# something is missing. Needs root (or prints what to install). PYTHON picks the interpreter
# the venv will be made with (default python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
missing=()

need_cmd() {  # need_cmd COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1 \
        || missing+=("$2")
}
need_pkg() {  # need_pkg PACKAGE
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || missing+=("$1")
}

need_cmd ip iproute2
need_cmd iptables iptables
need_cmd nft nftables
need_cmd nginx nginx-light
need_cmd curl curl
need_cmd socat socat
need_cmd sysctl procps
need_cmd bird bird2
need_cmd gcc gcc
need_pkg libnetfilter-queue-dev
need_pkg libc6-dev

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing+=(python3 python3-venv python3-dev)
else
    "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    "$PYTHON" - <<'PY' >/dev/null 2>&1 || missing+=(python3-dev)
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "install-deps: missing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: not root; run: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d: do not start the system nginx (or bird) service on install; the tests start their own
# nginx inside network namespaces.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
trap 'if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: installed ${missing[*]}"
