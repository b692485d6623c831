#!/usr/bin/env bash
# Create .venv and install kb with its test tools, the fine-tuning extra (the tests train an adapter) and the
# PostgreSQL extra (the store tests run on a real PostgreSQL). Safe to re-run; pip caches the llama.cpp build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,train,postgres]'
