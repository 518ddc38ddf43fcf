#!/usr/bin/env bash
# System services some tests need (installed from Debian's packages where we may: root, apt-get).
# Tests that need a missing service skip with a reason, except under CI=true where they must run.
# Idempotent and quick when everything is present; starts no long-lived service (tests start their own).
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "test-setup: cannot install ${missing[*]} (needs root and apt-get); those tests will skip" >&2
    exit 0
fi

install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

echo "test-setup: installing ${missing[*]} from Debian's packages" >&2
# Several engineers may share the machine: wait for another apt/dpkg run rather than failing.
if ! install -o DPkg::Lock::Timeout=300 "${missing[@]}"; then
    apt-get -o DPkg::Lock::Timeout=300 update -q
    install -o DPkg::Lock::Timeout=300 "${missing[@]}"
fi
