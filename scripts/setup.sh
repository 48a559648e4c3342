#!/usr/bin/env bash
# Create .venv with pairfree and its dev tools. torch/torchvision are pinned to the builds that
# lie on this machine's disk (pip's find-links), so no multi-GB wheel is ever downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
