#!/usr/bin/env bash
# The drift canary: install the newest versions requirements.txt and the extras allow into a fresh venv,
# say which packages moved from requirements.lock, and run the fast tests (not the ones marked slow).
# Exit 0: the lock can be refreshed (python tools/lock.py). Otherwise: fix the code or the bounds first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1
VENV=${CANARY_VENV:-/tmp/sd-lora-helpers-canary}
TORCH_VERSION=$(sed -n 's/^TORCH_VERSION = "\([^"]*\)".*/\1/p' tools/lock.py)

rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION" 2>/dev/null
echo "torch==$TORCH_VERSION" > "$VENV/torch.txt"
if ! "$VENV/bin/python" -m pip install -q --upgrade -c "$VENV/torch.txt" -r requirements.txt -e ".[notebook,render,test]" 2> "$VENV/pip.err"; then
  grep -v "^WARNING: Location" "$VENV/pip.err" >&2
  echo "canary: the newest allowed versions do not install together (see above)" >&2
  exit 2
fi

echo "== packages that moved from requirements.lock"
"$VENV/bin/python" - <<'PY'
import re
from importlib.metadata import distributions
from helpers.notebook.display import lock_sections
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {canon(p.split("==")[0]): p.split("==")[1] for pins in lock_sections("requirements.lock").values() for p in pins}
now = {canon(d.metadata["Name"]): d.version for d in distributions()}
moved = [(n, lock[n], now[n]) for n in sorted(lock) if n in now and now[n] != lock[n]]
new = sorted(set(now) - set(lock) - {"sd-lora-helpers", "torch", "pip", "setuptools"} - {n for n in now if n.startswith("nvidia-")})
for n, a, b in moved:
    print(f"  {n}: {a} -> {b}")
for n in new:
    print(f"  {n}: (not in the lock) {now[n]}")
if not moved and not new:
    print("  none: the lock is the newest the bounds allow")
PY
"$VENV/bin/python" -c "import torch, diffusers, transformers, peft, accelerate; print('resolved: torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"

echo "== fast tests on the newest versions"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" -x
rc=$?
if [ $rc -eq 0 ]; then
  echo "canary: the fast tests pass on the newest allowed versions"
else
  echo "canary: the fast tests FAIL on the newest allowed versions (rc $rc): fix the code or tighten requirements.txt" >&2
fi
exit $rc
