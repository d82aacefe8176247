#!/usr/bin/env bash
# The browser test drives Debian's Chromium through Playwright (never Playwright's own browser
# download, which needs the internet). Install it with apt when we are root (CI), else explain.
set -euo pipefail
if [ -n "${QUANTLAB_CHROMIUM:-}" ] && [ -x "${QUANTLAB_CHROMIUM}" ]; then exit 0; fi
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo ">> installing Debian's chromium for the browser test"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium >/dev/null
  exit 0
fi
echo "error: the browser test needs Chromium. Install it (Debian/Ubuntu: sudo apt-get install chromium)" >&2
echo "       or point QUANTLAB_CHROMIUM at a Chromium/Chrome binary." >&2
exit 1
