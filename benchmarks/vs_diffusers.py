"""Per-step training time: the diffusers example `train_text_to_image_lora.py` beside our trainer, same data and
settings, in one run.

Each side is run as its user runs it (a fresh process: `python <example> ...`, `python -m helpers train ...`) for a
short and a long run; per-step time is (long - short) / (long steps - short steps), so start-up, model loading
and the final save cancel. The runs alternate (reference, ours at equal work, ours with its defaults; short, then
long) and repeat, and the median is printed, so a busy machine slows every side alike.

- ours, equal work: `--no-cache-latents`, the VAE encodes every batch as the example does;
- ours, defaults: the latent cache on (each image encoded once).

The example lives in the diffusers repository (`examples/text_to_image/`), not in the pip package: give its path.
It needs `datasets` and `torchvision`, which this project does not install; `--reference-path` puts a folder
holding them on the reference's PYTHONPATH only. torchvision's PyPI wheels are CUDA builds, whose compiled ops do
not load beside a CPU-only torch; `--torchvision-from DIR` (DIR: such a wheel's `torchvision` folder) then gives
the example torchvision's own pure-Python transforms, the only part of it the example uses, without loading them.

    python benchmarks/vs_diffusers.py --example diffusers/examples/text_to_image/train_text_to_image_lora.py
    python benchmarks/vs_diffusers.py --example ... --gpu            # full-size SD 1.5 at 512 px, random weights
    python benchmarks/vs_diffusers.py --tiny --ours-only             # the smallest run (the test runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Settings:
    """What both sides train with."""

    resolution: int = 32
    batch: int = 32
    rank: int = 8
    learning_rate: float = 1e-4
    precision: str = "no"        # accelerate's name: no | fp16 | bf16
    images: int = 24
    short: int = 25
    long: int = 225


@dataclass
class Result:
    impl: str
    runs: list[tuple[int, float]] = field(default_factory=list)   # (steps, seconds)

    def per_step(self) -> list[float]:
        """Per-step seconds of each (short, long) pair, in run order."""
        n_short, n_long = min(n for n, _ in self.runs), max(n for n, _ in self.runs)
        short = [t for n, t in self.runs if n == n_short]
        long = [t for n, t in self.runs if n == n_long]
        return [(b - a) / (n_long - n_short) for a, b in zip(short, long)]


def write_dataset(folder: Path, n: int, size: int) -> Path:
    """The toy concept as both sides read it: `name.png` + `name.txt` (ours) and `metadata.jsonl` with
    `file_name` / `text` (the example's imagefolder)."""
    from helpers.toy.world import write_concept_dataset

    write_concept_dataset(folder, n=n, size=size)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        for png in sorted(folder.glob("*.png")):
            text = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
            f.write(json.dumps({"file_name": png.name, "text": text}) + "\n")
    return folder


def write_full_size_model(folder: Path) -> Path:
    """A full-size SD 1.5 pipeline with random weights (speed does not depend on their values), in fp32."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_step import CLIP_L, SD15_UNET, SD_VAE, _text_config

    from helpers.toy.tiny import load_tiny_tokenizer, write_clip_tokenizer

    tok = load_tiny_tokenizer(write_clip_tokenizer(folder / "_tok"))
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE, sample_size=512),
        text_encoder=CLIPTextModel(_text_config(tok, **CLIP_L)), tokenizer=tok,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder / "model"))
    return folder / "model"


def torchvision_shim(folder: Path, real: Path) -> Path:
    """A `torchvision` package whose submodules are the real ones in `real`, without the real `__init__` (which
    loads the compiled ops): `from torchvision import transforms` then runs torchvision's own transform code."""
    pkg = folder / "torchvision"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"__path__ = [{str(real)!r}]\n__version__ = 'transforms only'\n")
    return folder


def reference_command(example: Path, model: Path, data: Path, out: Path, s: Settings, steps: int) -> list[str]:
    """The example's command line for these settings (its LoRA targets to_q/k/v/out are our `attention`)."""
    return [sys.executable, str(example), f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}",
            f"--resolution={s.resolution}", f"--train_batch_size={s.batch}", f"--rank={s.rank}",
            f"--learning_rate={s.learning_rate}", f"--max_train_steps={steps}", f"--output_dir={out}",
            f"--mixed_precision={s.precision}", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--seed=0",
            "--dataloader_num_workers=0", "--checkpointing_steps=1000000", "--report_to=tensorboard"]


def ours_command(model: Path, data: Path, out: Path, s: Settings, steps: int, cache_latents: bool) -> list[str]:
    """Our trainer's command line for the same settings (rank = alpha: the example's scale 1)."""
    return [sys.executable, "-m", "helpers", "train", "--pretrained-model", str(model), "--train-data-dir",
            str(data), "--resolution", str(s.resolution), "--train-batch-size", str(s.batch), "--rank", str(s.rank),
            "--alpha", str(float(s.rank)), "--target", "attention", "--learning-rate", str(s.learning_rate),
            "--max-train-steps", str(steps), "--mixed-precision", s.precision, "--optimizer", "adamw",
            "--lr-scheduler", "constant", "--lr-warmup-steps", "0", "--seed", "0", "--output-dir", str(out),
            "--no-enable-bucket", "--no-progress", "--cache-latents" if cache_latents else "--no-cache-latents"]


def run_once(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Wall seconds of one run; its output goes to `log`. A failed run stops the benchmark with its log's tail."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{cmd[1]} ... failed (exit {code}); the end of {log}:\n" + "\n".join(tail))
    return seconds


def format_table(results: list[Result], s: Settings) -> str:
    lines = ["| run | s/step (median) | images/s | vs. the example |", "|---|---|---|---|"]
    ref = next((r for r in results if r.impl == "diffusers example"), None)
    ref_step = statistics.median(ref.per_step()) if ref else None
    for r in results:
        step = statistics.median(r.per_step())
        ratio = f"{ref_step / step:.2f}x" if ref_step else "-"
        lines.append(f"| {r.impl} | {step:.3f} | {min(s.batch, s.images) / step:.1f} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example", type=Path, help="path to diffusers' examples/text_to_image/train_text_to_image_lora.py")
    p.add_argument("--reference-path", default="", help="extra PYTHONPATH for the example (datasets, torchvision)")
    p.add_argument("--torchvision-from", type=Path, help="a torchvision folder whose transforms the example uses "
                   "without its compiled ops (a CUDA wheel beside a CPU-only torch)")
    p.add_argument("--ours-only", action="store_true", help="skip the example (our two runs only)")
    p.add_argument("--gpu", action="store_true", help="full-size SD 1.5 at 512 px with random weights, fp16, batch 1")
    p.add_argument("--tiny", action="store_true", help="the tiny test model, 2 and 4 steps: a smoke run")
    p.add_argument("--model", type=Path, help="a diffusers folder to train (default: the toy base)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--short", type=int)
    p.add_argument("--long", type=int)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.ours_only and (args.example is None or not args.example.is_file()):
        raise SystemExit("--example must be the path of diffusers' examples/text_to_image/"
                         "train_text_to_image_lora.py (or pass --ours-only)")
    s = Settings()
    if args.gpu:
        s = Settings(resolution=512, batch=1, precision="fp16", short=20, long=120)
    if args.tiny:
        s = Settings(batch=4, images=8, short=2, long=4)
    s.short, s.long = args.short or s.short, args.long or s.long
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = write_dataset(tmp / "data", s.images, s.resolution)
        if args.model:
            model = args.model
        elif args.gpu:
            model = write_full_size_model(tmp)
        elif args.tiny:
            from helpers.toy.tiny import build_tiny_sd15, write_clip_tokenizer

            model = tmp / "tiny"
            build_tiny_sd15(write_clip_tokenizer(tmp / "tok")).save_pretrained(str(model))
        else:
            from helpers.toy.pretrain import SHIPPED_DIR

            model = SHIPPED_DIR
        sides: list[tuple[Result, object]] = []
        if not args.ours_only:
            shim = str(torchvision_shim(tmp / "shim", args.torchvision_from)) if args.torchvision_from else ""
            paths = (shim, args.reference_path, env.get("PYTHONPATH", ""))
            ref_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in paths if p))
            sides.append((Result("diffusers example"),
                          lambda n, out: (reference_command(args.example, model, data, out, s, n), ref_env)))
        sides.append((Result("ours, equal work (no latent cache)"),
                      lambda n, out: (ours_command(model, data, out, s, n, cache_latents=False), env)))
        sides.append((Result("ours, defaults (latent cache)"),
                      lambda n, out: (ours_command(model, data, out, s, n, cache_latents=True), env)))
        for rep in range(args.repeats):
            for steps in (s.short, s.long):
                for i, (result, make) in enumerate(sides):
                    out = tmp / f"out_{i}_{rep}_{steps}"
                    cmd, run_env = make(steps, out)
                    seconds = run_once(cmd, run_env, tmp / f"log_{i}_{rep}_{steps}.txt")
                    result.runs.append((steps, seconds))
                    print(f"{result.impl}: {steps} steps in {seconds:.1f} s", flush=True)
        results = [r for r, _ in sides]
    import torch

    print(format_table(results, s))
    print(f"settings: {s}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    summary = {"settings": s.__dict__, "results": [{"impl": r.impl, "runs": r.runs, "per_step": r.per_step()}
                                                   for r in results]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
