#!/usr/bin/env bash
# System programs the test suite needs beyond the Python environment:
# OpenSSH's sshd (the SSH transport is tested against the real server) and
# Debian's Chromium with its driver (the queen's web page is tested in a
# real headless browser; nothing downloads a browser of its own).
set -euo pipefail

say() { printf '[test-deps] %s\n' "$*"; }

# need PROGRAM VERSION_FLAG PACKAGE...: install PACKAGE... with apt when PROGRAM is missing.
need() {
    local program=$1 version_flag=$2
    shift 2
    if [ -x "$program" ]; then
        say "✅ $(basename "$program") present ($program)"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "[test-deps] ❌ $program is missing and installing it needs root." >&2
        echo "[test-deps]    Install it with: sudo apt-get install -y --no-install-recommends $*" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "[test-deps] ❌ $program is missing and apt-get is not available: install $* by hand." >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    say "📦 installing $* ($(basename "$program") is missing)"
    if ! apt-get install -y --no-install-recommends "$@"; then
        say "🔄 install failed, refreshing the package lists (apt-get update) and trying again"
        apt-get update
        apt-get install -y --no-install-recommends "$@"
    fi
    if [ ! -x "$program" ]; then
        echo "[test-deps] ❌ $* installed but $program is still missing" >&2
        exit 1
    fi
    say "✅ installed $* ($("$program" "$version_flag" 2>&1 | head -n 1 || true))"
}

need /usr/sbin/sshd -V openssh-server
need /usr/bin/chromium --version chromium
need /usr/bin/chromedriver --version chromium-driver
