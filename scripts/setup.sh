#!/usr/bin/env bash
# Set up crackscan in ./.venv and (unless --no-train) run the main job: a training run.
#   bash scripts/setup.sh             install, then train on ../shared/data/mendeley-dev if present,
#                                     else scan the bundled example with the shipped model
#   bash scripts/setup.sh --no-train  install only
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
echo "crackscan installed: $(.venv/bin/crackscan --version)"
[ "${1:-}" = "--no-train" ] && exit 0

DATA=../shared/data/mendeley-dev
WEIGHTS=../shared/weights/mobilenet_v2_imagenet1k.safetensors
if [ -d "$DATA" ]; then
    [ -f "$WEIGHTS" ] || WEIGHTS=imagenet
    .venv/bin/crackscan train "$DATA" --weights "$WEIGHTS"
else
    echo "No dataset at $DATA: demonstrating the shipped model instead (see README, 'Get the dataset')."
    .venv/bin/python -m crackscan.demo
fi
