#!/usr/bin/env bash
# The r2 serve page is tested in headless Chromium driven by Selenium: Debian's browser and its matching
# driver. Installed with apt-get only when missing (so a machine that has them, offline or not, goes on);
# where they cannot be installed the browser test fails and says what to install.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    && exit 0
fi
echo "warning: chromium and chromium-driver are missing and could not be installed (apt-get as root);" \
  "the browser test of r2 serve will fail" >&2
