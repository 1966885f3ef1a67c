#!/usr/bin/env bash
# Download, on a machine with network, the wheels that scripts/gpu_check.sh installs on
# the lent GPU machine (which cannot reach a package index): the peers of the GPU
# benchmark and info-nce-pytorch (tests/test_losses.py needs it to be collected).
# torch, triton, numpy, pyyaml, accelerate, scikit-learn, tqdm, matplotlib,
# hypothesis, pytest, timm, huggingface-hub, safetensors, regex and torchvision are
# already in that machine's image. ~2.4 MB in all.
#
#   bash scripts/fetch_gpu_wheels.sh          # into .whl/ (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl inf-cl==1.2.1 info-nce-pytorch==0.1.4 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
ls -l .whl
