#!/usr/bin/env bash
# What the tests need: Debian's chromium and chromium-driver (the review app's browser test), then
# whalefast with its test extras. The README's test command runs this, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1; then
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver
  fi
fi
python3 -m pip install -q -e ".[test]"
