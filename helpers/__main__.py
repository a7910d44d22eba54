"""Command line: python -m helpers {prepare,masks,tag,train,generate,evaluate,demo,...} ...

Every field of a command's config dataclass is a flag (`--rank 8`, `--flip-aug`, `--no-cache-latents`,
`--lora a.safetensors:0.8`), with the field's help text; flags override the values of `--config my.toml`,
which override the defaults. The same dataclasses the notebooks and their forms build.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .cli import add_config_flags, config_from_args, run_command  # noqa: E402


def cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import train

    from .config import TrainConfig

    cfg = config_from_args(TrainConfig, args)
    result = train(cfg, progress=not args.no_progress)
    if result.lora_path:
        print(f"saved {result.lora_path} after {result.steps} steps (final loss {result.final_loss:.4f})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import GenerateConfig
    from .generate.inference import generate_to_folder
    from .sd.models import load_base, pick_dtype

    cfg = config_from_args(GenerateConfig, args)
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
    from .config import PrepareConfig
    from .data.prepare import prepare_from_config

    cfg = config_from_args(PrepareConfig, args)
    report = prepare_from_config(cfg, overwrite=args.overwrite, progress=not args.no_progress)
    print(report.summary())
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from .data.masking import make_masks, mask_sheet

    result = make_masks(args.folder, args.source, prompt=args.prompt, model=args.model, threshold=args.threshold,
                        device=args.device, progress=not args.no_progress)
    print(result.summary())
    if result.written:
        print(f"preview: {mask_sheet(args.folder)}")
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
    cfg = config_from_args(TagConfig, args)
    run = run_tag_config(folder, cfg, device=args.device, progress=not args.no_progress, note="python -m helpers tag")
    if run.captioned is not None:
        result = run.captioned
        print(f"captioned {len(result)} image(s), skipped {len(result.skipped)}, failed {len(result.failed)}")
        for name, why in result.failed.items():
            print(f"  failed: {name}: {why}")
    if run.entry is not None:
        print(f"captions saved (undo: python -m helpers tag {folder} --undo)")
    table = C.tag_frequency(run.captions)
    unit = "tag(s)" if table.unit == "tags" else "word(s) and phrase(s)"
    print(f"{len(run.captions)} caption(s), {len(table)} distinct {unit}; most frequent:")
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
        cfg = config_from_args(EvalConfig, args)
        if not cfg.model or not cfg.prompts:
            raise ValueError("evaluate needs --model and at least one --prompt (or --toy for the toy world)")
        result = run_protocol(cfg, seeds=args.seeds, **extra)
    print(open(result.markdown_path, encoding="utf-8").read())
    print(f"report: {result.report_path} and {result.html_path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .toolbox.inspect import format_info, inspect_lora

    for path in args.files:
        info = inspect_lora(path)
        print(json.dumps(info.to_dict(), indent=1, default=str) if args.json else format_info(info))
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .toolbox.resize import format_report, resize_lora

    report = resize_lora(args.src, args.dst, args.rank, method=args.dynamic_method, param=args.dynamic_param,
                         conv_rank=args.conv_rank)
    lines = format_report(report).splitlines()
    print("\n".join(lines if args.verbose else lines[-1:]))
    print(f"wrote {args.dst}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .toolbox.convert import convert_lora

    print(f"wrote {convert_lora(args.src, args.dst, to=args.to, model=args.model)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .toolbox.merge import merge_loras, merge_to_checkpoint

    loras = [_path_weight(x) for x in args.lora]
    if args.to_lora:
        print(f"wrote {merge_loras(loras, args.to_lora, model=args.model, rank=args.rank)}")
    else:
        for p in merge_to_checkpoint(args.model, loras, single_file=args.checkpoint, diffusers_dir=args.diffusers):
            print(f"wrote {p}")
    return 0


def _path_weight(text: str) -> tuple[str, float]:
    """"file.safetensors:0.8" -> (file, 0.8); no weight: 1.0."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def cmd_extract(args: argparse.Namespace) -> int:
    from .toolbox.extract import extract_lora

    path, report = extract_lora(args.base, args.tuned, args.dst, args.rank, conv_rank=args.conv_rank,
                                clamp_quantile=args.clamp_quantile, min_diff=args.min_diff,
                                text_encoder=not args.unet_only)
    for r in report if args.verbose else []:
        print(f"{r.component}.{r.name:<70} rank {r.rank:<3} fro retained {r.fro_retained:6.1%}")
    mean = sum(r.fro_retained for r in report) / len(report)
    print(f"{len(report)} layers differ; fro retained: mean {mean:.1%}, lowest "
          f"{min(r.fro_retained for r in report):.1%}\nwrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .toy.demo import run_demo

    run_demo(steps=args.steps, out_root=Path(args.out), samples=args.samples, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_prepare_parser, _masks_parser, _tag_parser, _train_parser, _generate_parser, _evaluate_parser,
                _inspect_parser,
                _resize_parser, _convert_parser, _merge_parser, _extract_parser, _demo_parser):
        add(sub)
    return run_command(parser.parse_args(argv))


def _verb(sub, name: str, cls: type | None, help: str, func, toml: str = "") -> argparse.ArgumentParser:
    """A subcommand; with a config class, `--config FILE` and one flag per field of it."""
    p = sub.add_parser(name, help=help, description=help)
    if cls is not None:
        p.add_argument("--config", default=None,
                       help=f"TOML file of {cls.__name__} settings" + (f" ({toml})" if toml else ""))
        add_config_flags(p, cls)
    p.set_defaults(func=func)
    return p


def _prepare_parser(sub) -> None:
    from .config import PrepareConfig

    p = _verb(sub, "prepare", PrepareConfig, "check, convert, crop and de-duplicate a folder or zip of images into a "
              "prepared copy (the source is never changed)", cmd_prepare, "01_dataset writes one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared copy")
    p.add_argument("--no-progress", action="store_true")


def _masks_parser(sub) -> None:
    p = _verb(sub, "masks", None, "write a loss mask per image of a prepared set (_masks/, for masked_loss): "
              "from a text prompt with CLIPSeg, or from the face prepare found", cmd_masks)
    p.add_argument("folder", help="a prepared set (prepare's output folder)")
    p.add_argument("--source", choices=("clipseg", "face"), default="clipseg")
    p.add_argument("--prompt", default="", help='clipseg: what the mask keeps, e.g. "a person"')
    p.add_argument("--model", default=None, help="clipseg: hub id or folder (default CIDAS/clipseg-rd64-refined)")
    p.add_argument("--threshold", type=float, default=0.3, help="clipseg: probability at or above which a pixel counts")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cuda, cpu")
    p.add_argument("--no-progress", action="store_true")


def _tag_parser(sub) -> None:
    from .config import TagConfig

    p = _verb(sub, "tag", TagConfig, "caption images (BLIP, Florence-2, WD14, Qwen2.5-VL, JoyCaption) and edit "
              "the captions of a whole "
              "folder", cmd_tag, "02_tagging writes one")
    p.add_argument("folder", help="folder of images with .txt captions (a prepared copy)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cuda, cpu")
    p.add_argument("--undo", action="store_true", help="restore the captions as they were before the last change")
    p.add_argument("--top", type=int, default=20, help="tags shown in the frequency table (default: 20)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer (model id or folder) to check the 77-token limit")
    p.add_argument("--tokenizer-subfolder", default="tokenizer", help="its subfolder (default: tokenizer)")
    p.add_argument("--no-progress", action="store_true")


def _train_parser(sub) -> None:
    from .config import TrainConfig

    p = _verb(sub, "train", TrainConfig, "train a LoRA (or DreamBooth, Textual Inversion) from a TOML config and/or "
              "flags", cmd_train, "written by save_config and the notebooks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _generate_parser(sub) -> None:
    from .config import GenerateConfig

    p = _verb(sub, "generate", GenerateConfig, "generate images with a base model and LoRAs", cmd_generate,
              "04_inference writes one")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16/bf16 on a GPU, fp32 on CPU), fp16, bf16, fp32")
    p.add_argument("--attention-slicing", action="store_true", help="less GPU memory, a little slower")
    p.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    p.add_argument("--cpu-offload", action="store_true",
                   help="keep models on the CPU until they run (CUDA + accelerate; SDXL on a T4)")


def _evaluate_parser(sub) -> None:
    from .config import EvalConfig

    p = _verb(sub, "evaluate", EvalConfig, "the evaluation protocol: base model vs LoRAs, CLIP-T/CLIP-I/DINO/KID/FID, "
              "trigger-word test, report", cmd_evaluate, "05_eval writes one")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="explicit seeds (instead of --num-seeds)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one), cuda, cpu")
    p.add_argument("--toy", action="store_true", help="the toy world: toy base, shipped toy LoRA, toy judge")
    p.add_argument("--no-progress", action="store_true")


def _inspect_parser(sub) -> None:
    p = _verb(sub, "inspect", None, "what is in a LoRA file: family, network type, rank/alpha per block, "
              "training settings, tags, hashes", cmd_inspect)
    p.add_argument("files", nargs="+", help="LoRA .safetensors files")
    p.add_argument("--json", action="store_true", help="the full report as JSON (metadata included)")


def _resize_parser(sub) -> None:
    from .toolbox.resize import DYNAMIC_METHODS

    p = _verb(sub, "resize", None, "reduce a LoRA's rank by SVD, to a fixed rank or per module (sd-scripts' "
              "dynamic methods)", cmd_resize)
    p.add_argument("src", help="the LoRA to resize (kohya layout .safetensors)")
    p.add_argument("dst", help="the resized file to write")
    p.add_argument("--rank", type=_positive_int, required=True, help="the new rank (the most a dynamic method keeps)")
    p.add_argument("--conv-rank", type=_positive_int, default=None, help="new rank of 3x3 convolutions (LoCon)")
    p.add_argument("--dynamic-method", choices=DYNAMIC_METHODS, default=None,
                   help="sv_ratio: keep singular values >= max / param; sv_cumulative / sv_fro: keep this share "
                        "of their sum / of the Frobenius norm")
    p.add_argument("--dynamic-param", type=float, default=None, help="the dynamic method's parameter (e.g. 0.9)")
    p.add_argument("--verbose", action="store_true", help="one line per module: rank kept, norm retained")


def _convert_parser(sub) -> None:
    from .toolbox.convert import TARGETS

    p = _verb(sub, "convert", None, "convert a LoRA between the kohya layout (A1111, ComfyUI) and the "
              "diffusers/peft layout, alphas kept", cmd_convert)
    p.add_argument("src", help="the LoRA: a .safetensors file (any layout) or a diffusers LoRA folder")
    p.add_argument("dst", help="kohya: a .safetensors file; diffusers: a folder")
    p.add_argument("--to", choices=TARGETS, required=True, help="the layout to write")
    p.add_argument("--model", required=True, help="the base model (diffusers folder or hub id): only its "
                                                  "configs are read, to match keys to modules")


def _merge_parser(sub) -> None:
    p = _verb(sub, "merge", None, "merge LoRAs at weights into the base model (a single-file checkpoint and/or a "
              "diffusers folder) or into one LoRA", cmd_merge)
    p.add_argument("--model", required=True, help="the base model (hub id, diffusers folder or .safetensors)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                   help="a LoRA and its weight (default 1); repeat for several")
    p.add_argument("--checkpoint", help="write the merged model as this single-file .safetensors (A1111, ComfyUI)")
    p.add_argument("--diffusers", help="write the merged model as this diffusers folder")
    p.add_argument("--to-lora", help="instead: write the LoRAs merged into one LoRA file")
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="with --to-lora: the merged LoRA's rank by SVD (default: exact, the ranks concatenated)")


def _extract_parser(sub) -> None:
    p = _verb(sub, "extract", None, "extract a LoRA (or LoCon) from a fine-tuned model minus its base, by SVD",
              cmd_extract)
    p.add_argument("--base", required=True, help="the base model the fine-tune started from")
    p.add_argument("--tuned", required=True, help="the fine-tuned / DreamBooth model")
    p.add_argument("dst", help="the LoRA file to write (kohya layout)")
    p.add_argument("--rank", type=_positive_int, required=True)
    p.add_argument("--conv-rank", type=_positive_int, default=None, help="also the 3x3 convolutions, at this "
                                                                         "rank (a LoCon)")
    p.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp the factors' outliers at this "
                                                                      "quantile (sd-scripts: 0.99; 1: no clamp)")
    p.add_argument("--min-diff", type=float, default=1e-6, help="layers that differ less are left out")
    p.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    p.add_argument("--verbose", action="store_true", help="one line per layer: rank and norm kept")


def _demo_parser(sub) -> None:
    p = _verb(sub, "demo", None, "offline demo: teach the toy base model a new concept, write grids and scores",
              cmd_demo)
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--samples", type=_positive_int, default=32, help="samples the judge scores per cell")
    p.add_argument("--out", default=".", help="folder that receives lora_files/ and demo_images/")
    p.add_argument("--no-progress", action="store_true")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
