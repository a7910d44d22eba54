"""Everything a GPU can show that a CPU cannot, in one run of under 10 minutes, written as one JSON file.

1. `train_step.py`: our step and the diffusers example's step at T4 settings (fp16, batch 1, gradient
   checkpointing, 8-bit AdamW, cached latents) and A100/H100 settings (bf16, batch 8), SD 1.5 and SDXL;
   then our step with `--channels-last` and with `--compile` (SD 1.5, A100 setting, `full` preset);
2. `memory.py --measure`: each preset's estimated peak beside the peak measured on this GPU;
3. `vs_diffusers.py --gpu`: the diffusers example script against our trainer, full-size SD 1.5 at 512 px
   (only with `--example`: the script lives in the diffusers repository).
Each part runs in its own process with its own time limit; a part that fails or runs out of time is recorded
as such and the suite goes on.

On a machine without network, install the wheels `benchmarks/gpu_wheels.sh` downloaded first:
    pip install --no-index --find-links wheels -r requirements.lock -e . bitsandbytes
    HF_HUB_OFFLINE=1 python benchmarks/gpu_suite.py --json gpu.json [--example .../train_text_to_image_lora.py]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def parts(example: Path | None, tmp: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of each part, in the order they run."""
    py = sys.executable
    out = []
    out.append(("train_step", [py, str(BENCH / "train_step.py"), "--steps", "10", "--json", str(tmp / "steps.json")],
                200))
    out.append(("train_step_options", [py, str(BENCH / "train_step.py"), "--families", "sd1", "--settings", "a100",
                                       "--presets", "full", "--channels-last", "--compile", "--no-reference",
                                       "--json", str(tmp / "options.json")], 110))
    out.append(("memory", [py, str(BENCH / "memory.py"), "--measure", "--json", str(tmp / "memory.json")], 140))
    if example is not None:
        out.append(("vs_diffusers", [py, str(BENCH / "vs_diffusers.py"), "--gpu", "--repeats", "1", "--example",
                                     str(example), "--json", str(tmp / "vs.json")], 140))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--example", type=Path, help="diffusers' examples/text_to_image/train_text_to_image_lora.py")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, cmd, limit in parts(args.example, tmp):
            print(f"== {name} (at most {limit} s): {' '.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            start = time.perf_counter()
            try:
                done = subprocess.run(cmd, env=env, cwd=str(ROOT), timeout=limit, capture_output=True, text=True)
                status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
                tail = (done.stdout + done.stderr)[-4000:]
            except subprocess.TimeoutExpired as e:
                status, tail = f"timed out after {limit} s", str(e.stdout or "")[-4000:]
            part = {"status": status, "seconds": round(time.perf_counter() - start, 1), "output_tail": tail}
            produced = next((Path(c) for c in cmd if c.endswith(".json")), None)
            if produced is not None and produced.exists():
                part["result"] = json.loads(produced.read_text())
            results["parts"][name] = part
            print(tail[-1500:], flush=True)
            args.json.write_text(json.dumps(results, indent=1))   # what is done so far survives a cut-off
    return results


if __name__ == "__main__":
    main()
