#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (it renders the HTML report): Debian's package,
# installed only when no chromium is on PATH. Part of the README's test command and .ci/run.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium
