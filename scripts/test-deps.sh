#!/usr/bin/env bash
# System programs the test suite needs beyond the Python environment:
# OpenSSH's sshd (the SSH transport is tested against the real server).
set -euo pipefail

SSHD=/usr/sbin/sshd

say() { printf '[test-deps] %s\n' "$*"; }

if [ -x "$SSHD" ]; then
    say "✅ sshd present ($SSHD)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "[test-deps] ❌ $SSHD is missing and installing it needs root." >&2
    echo "[test-deps]    Install it with: sudo apt-get install -y --no-install-recommends openssh-server" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "[test-deps] ❌ $SSHD is missing and apt-get is not available: install OpenSSH's server by hand." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
say "📦 installing openssh-server (sshd is missing)"
if ! apt-get install -y --no-install-recommends openssh-server; then
    say "🔄 install failed, refreshing the package lists (apt-get update) and trying again"
    apt-get update
    apt-get install -y --no-install-recommends openssh-server
fi

if [ ! -x "$SSHD" ]; then
    echo "[test-deps] ❌ openssh-server installed but $SSHD is still missing" >&2
    exit 1
fi
say "✅ installed openssh-server ($("$SSHD" -V 2>&1 | head -n 1))"
