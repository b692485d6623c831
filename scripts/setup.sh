#!/usr/bin/env bash
# Create .venv and install kb with its test tools and the fine-tuning extra (the tests train an adapter). Safe to re-run; pip caches the llama.cpp build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,train]'
# unstructured's fast PDF path imports a few modules of unstructured-inference, whose own dependency list
# (timm -> torchvision) would replace the pinned CPU torch with a multi-GB CUDA build. Its modules that
# kb reaches need only what pyproject.toml already lists, so it goes in without its dependencies.
.venv/bin/pip install -q --no-deps 'unstructured-inference==1.6.14'
