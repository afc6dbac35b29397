#!/usr/bin/env bash
# Wheels the GPU machine lacks, for `python -m bench.gpu` (it installs them from .whl/ with --no-index).
# Run where pip reaches PyPI; then copy .whl/ to the GPU machine with the checkout. The GPU image has
# Python 3.12, torch, triton, safetensors, huggingface-hub, peft, accelerate, pyyaml, numpy, pillow,
# regex, requests, filelock and zipp; diffusers and its one missing
# requirement (importlib_metadata) travel. Pure-Python wheels: no platform to pick.
set -euo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-$(python -c 'import diffusers; print(diffusers.__version__)')}"
mkdir -p .whl
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d .whl "diffusers==${DIFFUSERS_VERSION}" "importlib_metadata==8.7.0"  # 9+ needs lazy-importer
ls -l .whl
