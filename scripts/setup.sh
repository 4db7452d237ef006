#!/usr/bin/env bash
# Installs what building and testing mirage-rt needs on a fresh Debian machine that has Rust
# and Python: cmake (liblsl is built from source by the lsl crate) and, with --tests, the peers the
# tests talk to (pyzmq, pylsl, nibabel, numpy, scipy, nilearn, scikit-learn, scikit-image,
# selenium with Debian's chromium for the console's browser test, pydicom and Debian's dcm2niix
# for the scanner readers). Idempotent and quiet when all is present.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing cmake and g++ with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ >/dev/null
fi
# Running the daemon needs no more; the tests (--tests) need their outside peers too.
[ "${1:-}" = "--tests" ] || exit 0
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
    || ! command -v dcm2niix >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing chromium, chromium-driver (the console's browser test) and dcm2niix" \
        "(the scanner readers' reference) with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver dcm2niix >/dev/null
fi
if ! python3 -c "import zmq, pylsl, nibabel, numpy, scipy, nilearn, sklearn, skimage, selenium, pydicom, yaml" \
    >/dev/null 2>&1; then
    echo "setup: installing the Python test peers (tests/python/requirements.txt)" >&2
    python3 -m pip install -q -r tests/python/requirements.txt
fi
