#!/bin/sh
# `make browser` (a step of `make test`): Debian's chromium for the headless-browser report test.
# A no-op where chromium exists; where it cannot be installed it prints one line and carries on,
# and that test skips saying why. Never fails the build.
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: chromium not found and apt-get is not available; the headless-Chromium report test will skip"
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    sudo="sudo -n"  # only where sudo needs no password; otherwise the install below fails and we carry on
fi
log="${TMPDIR:-/tmp}/vlpipe-install-chromium.log"
if $sudo apt-get update -q >"$log" 2>&1 &&
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >>"$log" 2>&1; then
    echo "browser: installed $(chromium --version 2>/dev/null || echo chromium) for the headless-Chromium report test"
else
    echo "browser: could not install chromium with apt-get (log: $log); the headless-Chromium report test will skip"
fi
exit 0
