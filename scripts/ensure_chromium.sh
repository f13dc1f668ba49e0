#!/bin/sh
# Make sure Debian's `chromium` is present for the report test (tests/test_eval_cli.py renders
# report.html in headless Chromium). Installs it with apt-get when missing and we are root (or
# have password-less sudo); otherwise says why and exits 0, and the test skips with that reason.
set -u
for bin in chromium chromium-browser; do
    if command -v "$bin" >/dev/null 2>&1; then
        exit 0
    fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no apt-get on this system; install Chromium yourself to run the report test" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "ensure_chromium: not root and no password-less sudo; run 'sudo apt-get install -y chromium'" >&2
    exit 0
fi
echo "ensure_chromium: installing Debian's chromium (one-time, for the report test)..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
    $SUDO apt-get update -q >/dev/null 2>&1 || true
    if ! $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
        echo "ensure_chromium: 'apt-get install chromium' failed (no package source reachable?)" >&2
        exit 0
    fi
fi
echo "ensure_chromium: installed $(command -v chromium)" >&2
