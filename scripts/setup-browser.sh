#!/usr/bin/env bash
# Install headless Chromium (Debian's `chromium` package) for the browser test of the MLflow UI
# (tests/pipeline/test_mlflow_ui.py). Idempotent: does nothing when /usr/bin/chromium exists.
# Uses sudo only when not root. Without apt-get it prints what to do and exits 0 (the test then skips).
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "setup-browser: $CHROMIUM already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-browser: apt-get not available; install Debian's 'chromium' package (or any Chromium at $CHROMIUM)" >&2
    echo "setup-browser: skipping; tests/pipeline/test_mlflow_ui.py will be skipped" >&2
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "setup-browser: not root and sudo not available; run as root: apt-get install -y --no-install-recommends chromium" >&2
        exit 1
    fi
fi

echo "setup-browser: installing chromium with apt-get (about 120 MB of packages)"
start=$(date +%s)
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
echo "setup-browser: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium) in $(( $(date +%s) - start )) s"
