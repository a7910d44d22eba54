"""Command line: python -m helpers {prepare,tag,train,generate,evaluate,demo} ...

Every TrainConfig field is a flag (`--rank 8`, `--flip-aug`, `--no-cache-latents`); flags override the
values of `--config my.toml`, which override the defaults. The same dataclass the notebooks build.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import get_type_hints

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
        elif f.name == "resume":  # --resume alone = the newest state; --resume PATH = that state
            parser.add_argument(*sorted(names), dest=f.name, nargs="?", const="latest", default=argparse.SUPPRESS,
                                metavar="STATE")
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
    from .train.loop import train

    cfg = build_train_config(args)
    result = train(cfg, progress=not args.no_progress)
    if result.lora_path:
        print(f"saved {result.lora_path} after {result.steps} steps (final loss {result.final_loss:.4f})")
    return 0


def _config_from_args(cls: type, args: argparse.Namespace):
    """A config dataclass from `--config FILE` (if given) with the flags the user set on top.

    The generate/evaluate parsers use argparse.SUPPRESS defaults, so an unset flag leaves the file's
    (or the dataclass's) value alone."""
    from .config import config_from_dict, load_config

    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    config = getattr(args, "config", None)
    if config:
        return dataclasses.replace(load_config(config, cls), **given)
    return config_from_dict(cls, given, source="command line")


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import GenerateConfig
    from .generate.inference import generate_to_folder
    from .sd.models import load_base, pick_dtype

    cfg = _config_from_args(GenerateConfig, args)
    if not cfg.model or not cfg.prompts:
        raise ValueError("generate needs --model and at least one --prompt (or a --config file that sets them)")
    device, dtype = args.device, args.dtype
    if args.cpu_offload and device.startswith("cuda") and _cuda():
        # offload moves each model to the GPU only while it runs: load on the CPU in the GPU's dtype
        device, dtype = "cpu", pick_dtype("cuda", args.dtype)
    base = load_base(cfg.model, device=device, dtype=dtype, config=cfg.model_config)
    memory = {k: getattr(args, k) for k in ("attention_slicing", "vae_slicing", "vae_tiling", "cpu_offload")}
    for path in generate_to_folder(base, cfg, memory=memory, log=print):
        print(path)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .config import config_from_dict
    from .config import PrepareConfig
    from .data.prepare import prepare_from_config

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrepareConfig) if hasattr(args, f.name)}
    if args.config:
        from .config import load_config

        cfg = dataclasses.replace(load_config(args.config, PrepareConfig), **overrides)
    else:
        cfg = config_from_dict(PrepareConfig, overrides, source="command line")
    report = prepare_from_config(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(report.summary())
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from .data import captions as C
    from .config import TagConfig
    from .data.tagging import run_tag_config

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    if args.undo:
        entry = C.undo(folder)
        print(f"restored the captions saved in {entry.name}")
        return 0
    cfg = _config_from_args(TagConfig, args)
    run = run_tag_config(folder, cfg, device=args.device, progress=not args.no_progress, note="python -m helpers tag")
    if run.captioned is not None:
        result = run.captioned
        print(f"captioned {len(result)} image(s), skipped {len(result.skipped)}, failed {len(result.failed)}")
        for name, why in result.failed.items():
            print(f"  failed: {name}: {why}")
    if run.entry is not None:
        print(f"captions saved (undo: python -m helpers tag {folder} --undo)")
    table = C.tag_frequency(run.captions)
    print(f"{len(run.captions)} caption(s), {len(table)} distinct tag(s); most frequent:")
    for tag, count in table[:args.top]:
        print(f"  {count:5d}  {tag}")
    if args.tokenizer:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer, subfolder=args.tokenizer_subfolder or None)
        long = C.check_token_lengths(run.captions, tokenizer)
        print(f"{len(long)} caption(s) longer than CLIP's 77 tokens" + (":" if long else ""))
        for name, n in long:
            print(f"  {n:4d} tokens  {name}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import EvalConfig
    from .evaluate.protocol import run_protocol
    from .toy.eval import run_toy_protocol

    given = vars(args)  # only the flags the user set (SUPPRESS defaults), plus the non-config ones
    for name in ("clip_model", "dino_model"):  # 'none' turns a metric off
        if isinstance(given.get(name), str) and given[name].lower() == "none":
            given[name] = None
    extra = dict(device=args.device, progress=not args.no_progress)
    if args.toy:
        toy = {k: given[k] for k in ("weights", "steps", "sampler", "cfg_scale", "batch_size", "fid_kid", "loras",
                                     "clip_model", "dino_model", "out_dir", "kid_subset_size") if k in given}
        result = run_toy_protocol(seeds=args.seeds or given.get("num_seeds", 4), **toy, **extra)
    else:
        cfg = _config_from_args(EvalConfig, args)
        if not cfg.model or not cfg.prompts:
            raise ValueError("evaluate needs --model and at least one --prompt (or --toy for the toy world)")
        result = run_protocol(cfg, seeds=args.seeds, **extra)
    print(open(result.markdown_path, encoding="utf-8").read())
    print(f"report: {result.report_path} and {result.html_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .toy.demo import run_demo

    run_demo(steps=args.steps, out_root=Path(args.out), samples=args.samples, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from .config import PrepareConfig

    p = sub.add_parser("prepare", help="check, convert, crop and de-duplicate a folder or zip of images into a "
                                       "prepared copy (the source is never changed)")
    p.add_argument("--config", help="TOML file of PrepareConfig settings")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared copy")
    p.add_argument("--no-progress", action="store_true")
    _add_config_flags(p, PrepareConfig)
    p.set_defaults(func=cmd_prepare)

    S = argparse.SUPPRESS  # unset flags leave the --config file's (or TagConfig's) value alone
    p = sub.add_parser("tag", help="caption images (BLIP, Florence-2, WD14) and edit the captions of a whole folder",
                       argument_default=S)
    p.add_argument("folder", help="folder of images with .txt captions (a prepared copy)")
    p.add_argument("--config", default=None, help="TOML file with a TagConfig (02_tagging writes one)")
    p.add_argument("--captioner", choices=["none", "blip", "florence2", "wd14"],
                   help="write captions with this model first")
    p.add_argument("--model", help="hub id or local folder of the captioner (default: its standard model)")
    p.add_argument("--mode", choices=["skip", "overwrite", "append", "prepend"],
                   help="what to do with images that already have a caption (default skip)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--task", help="Florence-2 task: <CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>")
    p.add_argument("--general-threshold", type=float, help="WD14 general tags (default 0.35)")
    p.add_argument("--character-threshold", type=float, help="WD14 character tags (default 0.85)")
    p.add_argument("--blacklist", nargs="+", help="WD14 tags never written")
    p.add_argument("--extension")
    p.add_argument("--trigger", help="trigger word, put first (keep_tokens=1 keeps it in place)")
    p.add_argument("--class-word", help="class word, put after the trigger")
    p.add_argument("--remove", nargs="+", help="tags to remove (glob patterns allowed: 'watermark*')")
    p.add_argument("--replace", action="append", help="OLD=NEW (repeatable)")
    p.add_argument("--dedupe", action="store_true", help="remove repeated tags within a caption")
    p.add_argument("--sort", action="store_true", help="sort tags by frequency across the set")
    p.add_argument("--max-tags", type=int, help="keep at most N tags per caption")
    p.add_argument("--keep-tokens", type=int, help="leading tags that sort/limit leave in place (default 1)")
    p.add_argument("--undo", action="store_true", default=False,
                   help="restore the captions as they were before the last change")
    p.add_argument("--top", type=int, default=20, help="tags shown in the frequency table")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer (model id or folder) to check the 77-token limit")
    p.add_argument("--tokenizer-subfolder", default="tokenizer")
    p.add_argument("--no-progress", action="store_true", default=False)
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("train", help="train a LoRA from a TOML config and/or flags")
    p.add_argument("--config", help="TOML file written by save_config / the notebooks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images with a base model and LoRAs", argument_default=S)
    p.add_argument("--config", default=None, help="TOML file with a GenerateConfig (04_inference writes one)")
    p.add_argument("--model", help="hub id, diffusers folder or .safetensors checkpoint")
    p.add_argument("--model-config", help="local diffusers folder with configs for a single-file model")
    p.add_argument("--lora", dest="loras", action="append", help="LoRA file, optionally with :weight (repeatable)")
    p.add_argument("--prompt", dest="prompts", action="append", help="repeatable")
    p.add_argument("--negative-prompt")
    p.add_argument("--steps", type=int, help="default 20")
    p.add_argument("--cfg-scale", type=float, help="default 7")
    p.add_argument("--seed", type=int)
    p.add_argument("--sampler", help="A1111 sampler name, e.g. 'DPM++ 2M Karras', 'Euler a' (default), 'DDIM'")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--weighting", action=argparse.BooleanOptionalAction,
                   help="A1111 prompt weighting: (word:1.3), (word), [word], BREAK, prompts over 75 tokens")
    p.add_argument("--embedding", dest="embeddings", action="append",
                   help="Textual Inversion file (.safetensors), optionally PATH=TOKEN (repeatable)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16/bf16 on a GPU, fp32 on CPU), fp16, bf16, fp32")
    p.add_argument("--attention-slicing", action="store_true", default=False, help="less GPU memory, a little slower")
    p.add_argument("--vae-slicing", action="store_true", default=False, help="decode a batch one image at a time")
    p.add_argument("--vae-tiling", action="store_true", default=False, help="decode large images in tiles")
    p.add_argument("--cpu-offload", action="store_true", default=False,
                   help="keep models on the CPU until they run (CUDA + accelerate; SDXL on a T4)")
    p.add_argument("--out", dest="out_dir", help="default outputs/generated")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="the evaluation protocol: base model vs LoRAs, CLIP-T/CLIP-I/DINO/KID/FID, "
                                        "trigger-word test, report", argument_default=S)
    p.add_argument("--config", default=None, help="TOML file with an EvalConfig (05_eval writes one)")
    p.add_argument("--model", help="base model: hub id, diffusers folder or .safetensors checkpoint")
    p.add_argument("--model-config", help="local diffusers folder with configs for a single-file model")
    p.add_argument("--lora", dest="loras", action="append", help="LoRA file to evaluate (repeatable: checkpoints, runs)")
    p.add_argument("--weights", type=float, nargs="+", help="LoRA weights to evaluate (default 1)")
    p.add_argument("--prompt", dest="prompts", action="append", help="the concept in its natural setting (repeatable)")
    p.add_argument("--context-prompt", dest="context_prompts", action="append",
                   help="the concept in a new context (repeatable)")
    p.add_argument("--prior-prompt", dest="prior_prompts", action="append",
                   help="a prompt without the concept: is the prior kept?")
    p.add_argument("--trigger", help="trigger word (the trigger test removes it from the prompts)")
    p.add_argument("--reference-dir", help="the training images (for CLIP-I, DINO, KID/FID)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="explicit seeds")
    p.add_argument("--num-seeds", type=int, help="seeds 0..N-1 when --seeds is not given (default 4)")
    p.add_argument("--steps", type=int, help="default 25")
    p.add_argument("--sampler", help="default DDIM")
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--negative-prompt")
    p.add_argument("--clip-skip", type=int)
    p.add_argument("--clip-model", help="CLIP id or folder ('none' to skip); default openai/clip-vit-large-patch14")
    p.add_argument("--dino-model", help="DINO id or folder ('none' to skip); default facebook/dino-vits16")
    p.add_argument("--fid-kid", action=argparse.BooleanOptionalAction,
                   help="KID/FID (need torch-fidelity's Inception; default on, off with --toy)")
    p.add_argument("--inception-weights", help="local InceptionV3 weights file for KID/FID (offline)")
    p.add_argument("--kid-subset-size", type=int, help="images per KID subset (default: the smaller set, at most 1000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", dest="out_dir", help="default outputs/eval")
    p.add_argument("--toy", action="store_true", default=False,
                   help="the toy world: toy base, shipped toy LoRA, toy judge")
    p.add_argument("--no-progress", action="store_true", default=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="offline demo: teach the toy base model a new concept, write grids and scores")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--samples", type=int, default=32, help="samples the judge scores per cell")
    p.add_argument("--out", default=".", help="folder that receives lora_files/ and demo_images/")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; errors meant for the user print as one line and exit 2.

    Bad settings, files and models raise ValueError (ConfigError is one), FileNotFoundError,
    FileExistsError or ModelLoadError, a stopped run TrainingError, a failed write OutputWriteError,
    each with a message a user can act on. HELPERS_DEBUG=1 shows the traceback."""
    from .atomic import OutputWriteError
    from .sd.models import ModelLoadError
    from .train.errors import TrainingError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModelLoadError, TrainingError, OutputWriteError) as e:
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
