#!/usr/bin/env bash
# Fetch into .whl/ the wheels bench/gpu.sh needs on the GPU machine, whose Python (3.12) has torch, timm, pandas, typer
# and rich but not whalefast's training libraries, and which reaches no package index. Run it here, then carry .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    fastai fastcore fasttransform fastprogress fastdownload plum-dispatch beartype imagehash PyWavelets pytorch-metric-learning
ls .whl
