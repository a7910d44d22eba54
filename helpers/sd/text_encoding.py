"""Turn captions into the conditioning the UNet expects, for SD 1.x/2.x and SDXL.

clip_skip follows AUTOMATIC1111: 1 = the last layer's output (after the final layer norm for
SD 1.x/2.x), 2 = the penultimate layer, and so on. SDXL always conditions on the penultimate
layer of both encoders (its "clip_skip 1"), and takes the pooled embedding from the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transfer import to_device


@dataclass
class PromptEmbeds:
    """Per-token embeddings (B, T, D) and, for SDXL, the pooled text embedding (B, D2)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for CLIP)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def final_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder's final layer norm (A1111 applies it to a clip-skipped layer too)."""
    # transformers 5: CLIPTextModel has the norm at the top; CLIPTextModelWithProjection under text_model.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_prompts(family: str, tokenizers: list, text_encoders: list[torch.nn.Module], captions: list[str],
                   *, clip_skip: int = 1, device: torch.device | str | None = None) -> PromptEmbeds:
    """Encode `captions` exactly as the matching diffusers pipeline does at inference."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (A1111 meaning: 1 = last layer), got {clip_skip}")
    device = device or text_encoders[0].device
    if family != "sdxl":
        te = text_encoders[0]
        ids = to_device(tokenize(tokenizers[0], captions), device)
        if clip_skip == 1:
            return PromptEmbeds(te(ids)[0])
        out = te(ids, output_hidden_states=True)
        return PromptEmbeds(final_norm(te)(out.hidden_states[-clip_skip]))

    hidden, pooled = [], None
    for tok, te in zip(tokenizers, text_encoders):
        ids = to_device(tokenize(tok, captions), device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-(clip_skip + 1)])
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds  # the projected pooled output of the second encoder
    return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)
