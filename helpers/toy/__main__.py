"""Command line for the toy world: python -m helpers.toy {judge} ...

`judge` trains the small classifier that scores toy generations and saves it (with its report) next to
this file, where `helpers.toy.judge.load_judge()` finds it. Each subcommand is an `_add_<name>(sub)`
function, listed in SUBCOMMANDS, that declares its flags and sets `func` to its `cmd_<name>(args) -> int`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_judge(sub: argparse._SubParsersAction) -> None:
    from .judge import DEFAULT_PATH

    p = sub.add_parser("judge", help="train the toy judge (shape/colour/background classifier) and save it",
                       description="Train the toy judge on freshly rendered, softened scenes, print its held-out "
                                   "accuracy and save it with a JSON report beside it.")
    p.add_argument("--vae", help="diffusers VAE folder, or the toy base model folder (uses its vae/): a share "
                                 "of training images go through encode->decode, like generated samples")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=750, help="held-out images per evaluation (default 750)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: fastest on a shared 2-core machine)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(DEFAULT_PATH), help=f"judge file (default {DEFAULT_PATH})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_judge)


def cmd_judge(args: argparse.Namespace) -> int:
    from ..sd.models import load_vae
    from .judge import report_path, save_judge, save_report, train_judge

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: the judge is saved as .safetensors, got {out.name!r}")
    vae = load_vae(args.vae, local_files_only=True) if args.vae else None
    judge, report = train_judge(seed=args.seed, steps=args.steps, batch_size=args.batch_size, vae=vae,
                                device=args.device, progress=not args.no_progress, n_eval=args.n_eval,
                                threads=args.threads)
    if args.vae:
        report["vae_source"] = str(args.vae)
    print(format_report(report))
    save_judge(judge, out)
    rep = save_report(report, report_path(out))
    print(f"saved {out} and {rep}")
    return 0


def format_report(report: dict) -> str:
    """The judge report as a small table of held-out accuracies."""
    rows = [("sharp renders", "sharp"), (f"blurred (sigma {report['eval_blur_sigma']})", "blurred"),
            ("VAE reconstructions", "vae_recon")]
    lines = [f"judge: {report['steps']} steps x {report['batch_size']} in {report['train_seconds']} s "
             f"({report['params']:,} params, {report['torch_threads']} thread(s))",
             f"{'held-out accuracy (' + str(report['n_eval']) + ' images)':34s}{'shape':>8s}{'colour':>8s}"
             f"{'background':>12s}"]
    for label, key in rows:
        if key in report:
            acc = report[key]
            lines.append(f"  {label:32s}{acc['shape']:>8.1%}{acc['colour']:>8.1%}{acc['background']:>12.1%}")
    if "pixel_check" in report:
        lines.append("pixel check (violet, five petals), share passing:   concept renders   world renders")
        for label, key in rows:
            if key in report["pixel_check"]:
                pc = report["pixel_check"][key]
                lines.append(f"  {label:32s}{pc['concept']:>17.1%}{pc['world']:>16.1%}")
    return "\n".join(lines)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields

    from .pretrain import SHIPPED_DIR, PretrainConfig

    p = sub.add_parser("pretrain", help="pretrain the toy base model (about 45 min on 2 CPU cores)")
    p.add_argument("--out", default=str(SHIPPED_DIR), help="output diffusers folder (default: the shipped one)")
    for f in fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    summary = pretrain(args.out, cfg)
    print(f"saved the toy base to {args.out} in {summary['minutes']} min "
          f"(VAE held-out MSE {summary['vae_holdout_mse']:.4f})")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .pretrain import SHIPPED_DIR

    p = sub.add_parser("evaluate", help="judge a toy model's samples: does it follow its prompts?")
    p.add_argument("--model", default=str(SHIPPED_DIR), help="toy diffusers folder (default: the shipped base)")
    p.add_argument("--lora", help="a LoRA file to apply at weight 1")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--out", help="write the scores as JSON here")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .demo import evaluate_lora
    from ..generate.inference import load_loras
    from ..sd.models import load_base
    from .judge import load_judge

    base = load_base(args.model)
    base.pipe.set_progress_bar_config(disable=True)
    adapter = load_loras(base.pipe, [(args.lora, 1.0)])[0] if args.lora else None
    scores = evaluate_lora(base.pipe, adapter, load_judge(), [1.0], n=args.samples)["1"]
    for key, value in scores.items():
        print(f"{key:<30} {value:6.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": _shown(args.model), "lora": args.lora and _shown(args.lora),
                                              "samples": args.samples, "scores": scores}, indent=2) + "\n")
    return 0


def _shown(path: str) -> str:
    """A path as a file written into the repository shows it: relative to the repository when inside it."""
    root = Path(__file__).resolve().parents[2]
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="LoRA vs DreamBooth vs Textual Inversion on the toy concept, judged alike")
    p.add_argument("--methods", nargs="+", default=["lora", "dreambooth", "textual_inversion"],
                   choices=["lora", "dreambooth", "textual_inversion", "textual_inversion_in_world"],
                   help="textual_inversion_in_world: TI on a concept the toy base can draw (a yellow cross)")
    p.add_argument("--samples", type=int, default=32, help="judged samples per prompt group (default 32)")
    p.add_argument("--out", default=".", help="folder that receives demo_images/ and outputs/")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import compare_methods

    compare_methods(Path(args.out), tuple(args.methods), samples=args.samples, progress=not args.no_progress)
    return 0


SUBCOMMANDS = [_add_judge, _add_pretrain, _add_evaluate, _add_methods]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    from ..cli import run_command

    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
