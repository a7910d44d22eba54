"""Tiny SD 1.5-like and SDXL-like pipelines built in code, for tests and offline smoke runs.

They keep the real block layout (block types, cross-attention placement, linear vs conv
projections, SDXL's text-time conditioning and two text encoders) at a few thousand times
fewer parameters, so the same loading, training and file-format code runs on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# CLIP's byte-to-unicode table: every byte gets a printable character, so any string tokenizes.


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


DEFAULT_WORDS = (
    "a photo of the and on in with background red green blue yellow white black gray navy "
    "circle square triangle cross flower sks ohwx style dog cat person painting"
).split()


def write_clip_tokenizer(folder: str | Path, words: list[str] | tuple[str, ...] = DEFAULT_WORDS,
                         model_max_length: int = 77) -> Path:
    """Write a CLIP-layout tokenizer (vocab.json, merges.txt, configs) that loads offline.

    Every byte is a token (so any text encodes) and each word in `words` is one token:
    its merges build it left to right, longest words first so their chains win.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    for ch in byte_chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted(set(w.lower() for w in words), key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for nxt in symbols[1:]:
            pair = (current, nxt)
            current = current + nxt
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            vocab.setdefault(current, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True, "errors": "replace"}))
    return folder


def load_tiny_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


def _text_config(vocab_size: int, hidden: int, layers: int, proj: int, max_len: int,
                 pad_token_id: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_len,
        projection_dim=proj, hidden_act=act, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=pad_token_id,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32, sample_size=32,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # SD 1.5 and SDXL ship DDPM-style beta schedules; the trainer builds its DDPM noise
    # scheduler from this config, inference swaps samplers by name.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd15(tokenizer_dir: str | Path, seed: int = 0):
    """A StableDiffusionPipeline with SD 1.5's layout: 3 cross-attention down blocks then a
    plain one, conv 1x1 proj_in/out, one CLIP-L-like text encoder. 32x32 images, 16x16 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = load_tiny_tokenizer(tokenizer_dir)
    te = CLIPTextModel(_text_config(len(tok), 32, 2, 32, tok.model_max_length, tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    return StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_sdxl(tokenizer_dir: str | Path, seed: int = 0):
    """A StableDiffusionXLPipeline with SDXL's layout: a plain down block then two with
    transformers (depth 1 and 2), linear proj_in/out, two text encoders (the second with
    projection, feeding the pooled embedding), text-time additional conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = load_tiny_tokenizer(tokenizer_dir)
    tok2 = load_tiny_tokenizer(tokenizer_dir)
    # Different widths, as in real SDXL (768 / 1280): diffusers 0.42's single-file loader tells the
    # two encoders apart by width and silently swaps them when they are equal.
    te1 = CLIPTextModel(_text_config(len(tok), 16, 2, 16, tok.model_max_length, tok.pad_token_id))
    te2 = CLIPTextModelWithProjection(
        _text_config(len(tok2), 48, 2, 32, tok2.model_max_length, tok2.pad_token_id, act="gelu"))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        cross_attention_dim=64, use_linear_projection=True, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    return StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet,
                                     scheduler=_scheduler(), force_zeros_for_empty_prompt=True)


def save_tiny_model(folder: str | Path, family: str = "sd15", seed: int = 0) -> Path:
    """Build a tiny pipeline of `family` ("sd15" or "sdxl") and save it as a diffusers folder."""
    folder = Path(folder)
    tok_dir = write_clip_tokenizer(folder / "_tokenizer_src")
    builder = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}.get(family)
    if builder is None:
        raise ValueError(f"family must be 'sd15' or 'sdxl', got {family!r}")
    pipe = builder(tok_dir, seed=seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for p in sorted(tok_dir.iterdir()):
        p.unlink()
    tok_dir.rmdir()
    return folder
