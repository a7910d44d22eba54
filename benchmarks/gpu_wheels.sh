#!/usr/bin/env bash
# Download every wheel the GPU suite needs into ./wheels (default), for a GPU machine without network:
# the lock (without torch: the GPU machine has its CUDA build), bitsandbytes, and the diffusers example's extras
# (datasets; torchvision, see below). Run it here, carry the folder, then on the GPU machine:
#   pip install --no-index --find-links wheels -r requirements.lock -e . bitsandbytes datasets
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-wheels}
mkdir -p "$dest"
grep -v -E '^(torch|nvidia-|triton)' requirements.lock > "$dest/lock-without-torch.txt"
pip download --only-binary :all: --no-deps -d "$dest" -r "$dest/lock-without-torch.txt"
pip download --only-binary :all: --no-deps -d "$dest" bitsandbytes     # (its torch is the machine's)
pip download --only-binary :all: -d "$dest" datasets                   # the example's loader, with its dependencies
# the example also imports torchvision: download the one matching the GPU machine's torch, e.g.
#   pip download --only-binary :all: --no-deps -d "$dest" torchvision==0.28.0   (for torch 2.13)
du -sh "$dest"
