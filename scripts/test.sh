#!/usr/bin/env bash
# Everything the tests need, then the tests: the README's test command (and CI's).
# Debian's chromium and chromium-driver drive the review app's browser test; pip brings the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver
  fi
  export WHALEFAST_REQUIRE_BROWSER=1  # installed above: the browser test must run, not skip
fi
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q "$@"
