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


MAX_TOKEN_LENGTHS = (75, 150, 225)   # sd-scripts' max_token_length: 1, 2 or 3 chunks of 75 tokens


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for CLIP)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def chunk_ids(tokenizer, captions: list[str], chunks: int) -> torch.Tensor:
    """(B * chunks, model_max_length) ids: each caption cut at chunks x (model_max_length - 2) tokens and
    split into chunks that each begin with BOS and end with EOS or padding, as sd-scripts' `get_input_ids`
    does for max_token_length 150/225 (a chunk the caption does not reach holds EOS and padding)."""
    size = tokenizer.model_max_length - 2
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stream = tokenizer(captions, padding="max_length", max_length=chunks * size + 2, truncation=True,
                       return_tensors="pt").input_ids
    rows = []
    for ids in stream:
        for k in range(chunks):
            chunk = torch.cat([ids[:1], ids[1 + k * size:1 + (k + 1) * size], ids[-1:]])
            if chunk[-2] not in (eos, pad):   # the caption runs through this chunk: close it with EOS
                chunk[-1] = eos
            if chunk[1] == pad:               # the caption ended before this chunk: it starts with EOS
                chunk[1] = eos
            rows.append(chunk)
    return torch.stack(rows)


def join_chunks(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * chunks, T, D) chunk states -> (B, 2 + chunks * (T - 2), D): the first chunk's BOS state, every
    chunk's inner states, the last chunk's final state (sd-scripts' get_hidden_states)."""
    per = hidden.reshape(batch, -1, hidden.shape[-1])
    t = hidden.shape[1]
    n = per.shape[1] // t
    inner = [per[:, k * t + 1:(k + 1) * t - 1] for k in range(n)]
    return torch.cat([per[:, :1], *inner, per[:, -1:]], dim=1)


def final_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The text encoder's final layer norm (A1111 applies it to a clip-skipped layer too)."""
    # transformers 5: CLIPTextModel has the norm at the top; CLIPTextModelWithProjection under text_model.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def encode_prompts(family: str, tokenizers: list, text_encoders: list[torch.nn.Module], captions: list[str],
                   *, clip_skip: int = 1, max_token_length: int = 75,
                   device: torch.device | str | None = None) -> PromptEmbeds:
    """Encode `captions` exactly as the matching diffusers pipeline does at inference; with max_token_length
    150 or 225, in 2 or 3 chunks as sd-scripts trains long captions (SDXL's pooled output: the first chunk's)."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (A1111 meaning: 1 = last layer), got {clip_skip}")
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    device = device or text_encoders[0].device
    chunks = max_token_length // 75

    def ids_for(tok) -> torch.Tensor:
        return to_device(tokenize(tok, captions) if chunks == 1 else chunk_ids(tok, captions, chunks), device)

    def joined(h: torch.Tensor) -> torch.Tensor:
        return h if chunks == 1 else join_chunks(h, len(captions))

    if family != "sdxl":
        te = text_encoders[0]
        ids = ids_for(tokenizers[0])
        if clip_skip == 1:
            return PromptEmbeds(joined(te(ids)[0]))
        out = te(ids, output_hidden_states=True)
        return PromptEmbeds(joined(final_norm(te)(out.hidden_states[-clip_skip])))

    hidden, pooled = [], None
    for tok, te in zip(tokenizers, text_encoders):
        out = te(ids_for(tok), output_hidden_states=True)
        hidden.append(joined(out.hidden_states[-(clip_skip + 1)]))
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds[::chunks]  # the projected pooled output of the second encoder, first chunk
    return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).to(torch.float32)
