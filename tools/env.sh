#!/usr/bin/env bash
# Make .venv ready to run the project: create it if missing, install torch sensibly, install the lock.
# Idempotent and quick when nothing changed (the installed lock's hash is kept in .venv/.lock-sha256).
#
# torch: a torch already in .venv is kept. A CUDA torch in the system Python is reused (the venv sees
# the system site-packages) and never replaced. Otherwise the tested version is installed:
# `pip install torch==$TORCH_VERSION`, from $TORCH_INDEX_URL when set (e.g. PyTorch's CPU index).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION = "\([^"]*\)".*/\1/p' tools/lock.py)
LOCK=${LOCK:-requirements.lock}

system_cuda_torch() {
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
  if system_cuda_torch; then
    echo "== creating $VENV (reusing the system's CUDA torch)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c 'import torch' 2>/dev/null; then
  echo "== installing torch==$TORCH_VERSION"
  "$VPY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi

want=$(sha256sum "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
have=$(cat "$VENV/.lock-sha256" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "== installing $LOCK"
  # the installed torch family is pinned as it is: nothing in the lock may replace it
  pins=$(mktemp)
  "$VPY" - > "$pins" <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for pkg in ("torch", "torchvision", "torchaudio"):
    try:
        print(f"{pkg}=={version(pkg)}")
    except PackageNotFoundError:
        pass
EOF
  "$VPY" -m pip install -q -r "$LOCK" -c "$pins"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
  rm -f "$pins"
  echo "$want" > "$VENV/.lock-sha256"
fi
"$VPY" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
