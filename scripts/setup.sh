#!/usr/bin/env bash
# Installs what building and testing mirage-rt needs on a fresh Debian machine that has Rust and
# Python: cmake (liblsl is built from source by the lsl crate), libsodium-dev and pkg-config
# (ZeroMQ's CURVE), lld (CI links with it) and, with --tests, the peers the tests talk to (pyzmq,
# pylsl, nibabel, numpy, scipy, nilearn, scikit-learn, scikit-image, selenium with Debian's
# chromium for the console's browser test, Debian's python3-torch with pip diffusers (the
# MindEye2 decoder's reference), pydicom and Debian's dcm2niix for the scanner readers, the npm
# BIDS validator).
# Idempotent and quiet when all is present.
set -euo pipefail
cd "$(dirname "$0")/.."
# libsodium-dev (found by pkg-config): the vendored libzmq links it for CURVE.
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1 \
    || ! pkg-config --exists libsodium 2>/dev/null || ! command -v ld.lld >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing cmake, g++, pkg-config, libsodium-dev and lld with apt-get" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ pkg-config libsodium-dev lld >/dev/null
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
# The official BIDS validator (npm bids-validator, pinned in tools/bids-validator), judge of
# `mirage export`; node and npm from Debian.
if ! command -v npm >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing nodejs and npm with apt-get (the BIDS validator)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -x tools/bids-validator/node_modules/.bin/bids-validator ]; then
    echo "setup: installing the BIDS validator (tools/bids-validator, npm ci)" >&2
    npm ci --prefix tools/bids-validator --no-audit --no-fund --loglevel=error >/dev/null
fi
# PyTorch (CPU), the MindEye2 decoder's judge: Debian's python3-torch, for Debian's own Python
# (the tests run its scripts with /usr/bin/python3, or $MIRAGE_TORCH_PYTHON).
if ! /usr/bin/python3 -c "import torch, numpy" >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing python3-torch with apt-get (the MindEye2 decoder's reference)" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-torch >/dev/null
fi
# diffusers 0.23 beside it, for the reference of the blurry branch's upsampler and the SD VAE
# (pip into Debian's Python; it keeps Debian's torch and numpy).
if ! /usr/bin/python3 -c "import diffusers" >/dev/null 2>&1; then
    echo "setup: installing diffusers 0.23.0 for Debian's Python (the SD VAE's reference)" >&2
    if ! /usr/bin/python3 -m pip --version >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
    fi
    /usr/bin/python3 -m pip install -q --break-system-packages "diffusers==0.23.0" "huggingface-hub<0.26"
fi
if ! python3 -c "import zmq, pylsl, nibabel, numpy, scipy, nilearn, sklearn, skimage, selenium, pydicom, yaml, bids" \
    >/dev/null 2>&1; then
    echo "setup: installing the Python test peers (tests/python/requirements.txt)" >&2
    python3 -m pip install -q -r tests/python/requirements.txt
fi
