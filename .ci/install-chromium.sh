#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for tests/test_report.py (the report screenshot
# test). Idempotent and never fatal: without Chromium that test skips with a reason.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
{ $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } \
    >/dev/null 2>&1 || echo "install-chromium: could not install chromium; the browser test will skip" >&2
exit 0
