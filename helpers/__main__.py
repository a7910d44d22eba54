"""Command line: python -m helpers {train,generate,demo} ...

Every TrainConfig field is a flag (`--rank 8`, `--flip-aug`, `--no-cache-latents`); flags override the
values of `--config my.toml`, which override the defaults. The same dataclass the notebooks build.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, get_type_hints

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; the default is a sentinel so we know what the user set."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        names = {flag, "--" + f.name} if "_" in f.name else {flag}
        if tp is bool:
            parser.add_argument(*sorted(names), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS)
        elif tp == list[str]:
            parser.add_argument(*sorted(names), dest=f.name, nargs="+", default=argparse.SUPPRESS)
        else:
            base = [t for t in getattr(tp, "__args__", (tp,)) if t is not type(None)][0]
            optional = type(None) in getattr(tp, "__args__", ())

            def convert(text: str, base=base, optional=optional, name=f.name):
                if optional and text.lower() in ("none", "null", ""):
                    return None
                try:
                    return base(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{name} expects {base.__name__}, got {text!r}") from None

            parser.add_argument(*sorted(names), dest=f.name, type=convert, default=argparse.SUPPRESS,
                                metavar=base.__name__.upper())


def build_train_config(args: argparse.Namespace):
    """TrainConfig from `--config` (if given) with the flags the user set on top."""
    from .config import TrainConfig, config_from_dict, load_config

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        base = load_config(args.config, TrainConfig)
        return dataclasses.replace(base, **overrides)
    return config_from_dict(TrainConfig, overrides, source="command line")


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = build_train_config(args)
    result = train(cfg, progress=not args.no_progress)
    if result.lora_path:
        print(f"saved {result.lora_path} after {result.steps} steps (final loss {result.final_loss:.4f})")
    return 0


def _parse_lora(text: str) -> tuple[str, float]:
    """`path` or `path:weight` (the weight defaults to 1.0)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not (len(path) == 1 and path.isalpha()):  # keep C:\ paths whole
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference import generate, load_loras, save_png
    from .models import load_base

    base = load_base(args.model, device=args.device, config=args.model_config)
    loras = [_parse_lora(x) for x in args.lora or []]
    load_loras(base.pipe, loras)
    out = Path(args.out)
    lora_names = [(Path(p).stem, w) for p, w in loras]
    for pi, prompt in enumerate(args.prompt):
        images, params = generate(base.pipe, prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                                  cfg_scale=args.cfg_scale, seed=args.seed, sampler=args.sampler,
                                  width=args.width, height=args.height, num_images=args.num_images,
                                  clip_skip=args.clip_skip, family=base.family, model_name=Path(args.model).name,
                                  loras=lora_names)
        for i, (image, text) in enumerate(zip(images, params)):
            path = save_png(image, out / f"{pi:03d}_{args.seed + i}.png", text)
            print(path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(steps=args.steps, out_root=Path(args.out), samples=args.samples, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA from a TOML config and/or flags")
    p.add_argument("--config", help="TOML file written by save_config / the notebooks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images with a base model and LoRAs")
    p.add_argument("--model", required=True, help="hub id, diffusers folder or .safetensors checkpoint")
    p.add_argument("--model-config", help="local diffusers folder with configs for a single-file model")
    p.add_argument("--lora", action="append", help="LoRA file, optionally with :weight (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", default="outputs/generated")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="offline demo: teach the toy base model a new concept, write grids and scores")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--samples", type=int, default=32, help="samples the judge scores per cell")
    p.add_argument("--out", default=".", help="folder that receives lora_files/ and demo_images/")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; errors meant for the user print as one line and exit 2.

    Bad settings, files and models raise ValueError (ConfigError is one), FileNotFoundError or
    ModelLoadError with a message a user can act on. HELPERS_DEBUG=1 shows the traceback."""
    from .models import ModelLoadError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModelLoadError) as e:
        if os.environ.get("HELPERS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
