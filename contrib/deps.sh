#!/usr/bin/env bash
# contrib/deps.sh - install the Debian 12 packages chatd needs to build, run
# and test, when they are missing.
#
# Every `make` target that needs packages runs this first, so it must be fast
# and quiet when everything is present: one dpkg-query call, no apt-get at all.
# When something is missing it prints one line per missing group, runs
# apt-get update once and installs the missing packages with
# --no-install-recommends (sudo when not root).
#
# We never use the system's nginx, MariaDB or Redis services: tests and
# `make run` start private servers on their own ports.  So while installing we
# keep the packages' maintainer scripts from starting those services (a
# temporary policy-rc.d that refuses every start, unless one is already in
# place), and on a systemd machine we disable the services we just installed.
set -euo pipefail

# group name and its packages.  libclang-rt-14-dev holds libFuzzer and the
# sanitizer runtimes; clang only recommends it, so it is listed on its own.
# prometheus gives promtool (exposition checks) and the server the metrics
# test scrapes chatd with.  browser: headless Chromium driven by Selenium for
# the web client's tests (tests/integration/test_web.py).
GROUPS_ORDER=(build fuzz libs servers python browser cluster monitoring package)
declare -A GROUP_PKGS=(
    [build]="build-essential cmake pkg-config"
    [fuzz]="clang libclang-rt-14-dev"
    [libs]="libuv1-dev libcjson-dev default-libmysqlclient-dev libhiredis-dev libcunit1-dev libinih-dev libcrypt-dev libedit-dev libhttp-parser-dev libsystemd-dev libssl-dev libwslay-dev openssl"
    [servers]="mariadb-server mariadb-client redis-server"
    [python]="python3 python3-websockets"
    [browser]="chromium chromium-driver python3-selenium"
    [cluster]="nginx-light libnginx-mod-stream"
    [monitoring]="prometheus"
    [package]="dpkg-dev lintian systemd"
)
# Packages whose install would start a system service we do not want.
declare -A SERVICE_OF_PKG=(
    [mariadb-server]=mariadb
    [redis-server]=redis-server
    [nginx-light]=nginx
    [prometheus]=prometheus
)

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "deps: dpkg-query not found: this script supports Debian 12 only" >&2
    exit 1
fi

all_pkgs=()
for g in "${GROUPS_ORDER[@]}"; do
    # shellcheck disable=SC2206 # word splitting of the package list is meant
    all_pkgs+=(${GROUP_PKGS[$g]})
done

# One dpkg-query for everything; packages dpkg never heard of are simply
# absent from its output (it complains on stderr, which we drop).
declare -A installed=()
while read -r name status; do
    [[ "$status" == installed ]] && installed[$name]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${all_pkgs[@]}" 2>/dev/null || true)

missing=()
for g in "${GROUPS_ORDER[@]}"; do
    group_missing=()
    for p in ${GROUP_PKGS[$g]}; do
        [[ -n "${installed[$p]:-}" ]] || group_missing+=("$p")
    done
    if ((${#group_missing[@]})); then
        echo "deps: missing $g: ${group_missing[*]}"
        missing+=("${group_missing[@]}")
    fi
done
((${#missing[@]})) || exit 0

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "deps: not root and no sudo: install as root: ${missing[*]}" >&2
        exit 1
    fi
    SUDO=(sudo)
fi

# Refuse service starts during the install unless a policy is already there.
POLICY=/usr/sbin/policy-rc.d
own_policy=0
cleanup() {
    if ((own_policy)); then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\n# written by chatd contrib/deps.sh during an install\nexit 101\n' |
        "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    own_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${missing[@]}"

# On a systemd machine the packages enabled their services for the next boot;
# we never use them, so disable (and stop, should one have started) the ones
# installed just now.  Services that were there before are left alone.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    for p in "${missing[@]}"; do
        svc=${SERVICE_OF_PKG[$p]:-}
        [[ -n "$svc" ]] || continue
        "${SUDO[@]}" systemctl disable --now --quiet "$svc" 2>/dev/null || true
    done
fi
echo "deps: installed ${missing[*]}"
