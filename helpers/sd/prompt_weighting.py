"""AUTOMATIC1111's prompt emphasis: `(word:1.3)`, `(word)` = x1.1, `[word]` = /1.1, `\\(` for a literal
bracket, `BREAK` to start a new 75-token chunk; prompts longer than 75 tokens are encoded in chunks
and concatenated, as A1111 does.

Why our own and not `compel`: compel 2.5.1 installs and runs with transformers 5 / diffusers 0.42,
but reads A1111's `(red:1.3)` as the literal text "red:1 . 3" and `[red]` as text (its syntax is
`(red)1.3` / `red++`), and it down-weights by masking tokens rather than scaling them. A1111's rule is
small: each token's output embedding is multiplied by its weight, then the chunk is rescaled so its
mean is what it was before.
"""

from __future__ import annotations

import re

import torch

from .text_encoding import PromptEmbeds, final_norm

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS (CLIP's 77 positions)
BREAK_WEIGHT = -1.0  # marker weight of a BREAK fragment in parse_prompt_attention's output

# One alternative per syntax element: escapes, a lone backslash, brackets, ":<number>)" closing
# a round bracket with an explicit weight, plain text, and a stray colon.
_SYNTAX = re.compile(r"""
    \\[\\()\[\]]            # escaped bracket or backslash
  | \\                      # lone backslash (dropped, as A1111 does)
  | \(                      # open round
  | \[                      # open square
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes a round bracket with that weight
  | \)                      # close round
  | \]                      # close square
  | [^\\()\[\]:]+           # text
  | :                       # a colon that is just text
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
# Extra-network tags (<lora:name:1>, <hypernet:...>) are instructions, not text to encode.
EXTRA_NETWORK_TAG = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


def strip_extra_networks(prompt: str) -> str:
    """The prompt without `<lora:name:w>`-style tags, as A1111 removes them before encoding."""
    return " ".join(EXTRA_NETWORK_TAG.sub("", prompt).split()) if EXTRA_NETWORK_TAG.search(prompt) else prompt


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs, adjacent runs of equal weight merged;
    `BREAK` comes out as ("BREAK", -1.0). Unclosed brackets apply to the end of the prompt."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _SYNTAX.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _is_float(weight):
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for piece, weight in res[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(t, float(w)) for t, w in merged]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def weighted_chunks(tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """The prompt's token ids and per-token weights in chunks of at most 75 (no BOS/EOS yet);
    BREAK ends a chunk early. At least one (possibly empty) chunk."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(strip_extra_networks(prompt)):
        if weight == BREAK_WEIGHT and piece == "BREAK":
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        if not piece:
            continue
        for token in _tokenize(tokenizer, piece):
            if len(ids) == CHUNK_TOKENS:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def _tokenize(tokenizer, text: str) -> list[int]:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "sequence longer than 77" warning: we chunk ourselves
    try:
        return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
    finally:
        hf_logging.set_verbosity(before)


def _pad_chunk(tokenizer, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """BOS + ids + EOS, padded with the tokenizer's pad token to 77, as diffusers tokenizes."""
    length = CHUNK_TOKENS + 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    full += [pad] * (length - len(full))
    w = [1.0] + weights + [1.0] + [1.0] * (length - 2 - len(weights))
    return full, w


def _emphasize(z: torch.Tensor, weights: torch.Tensor, restore_mean: bool) -> torch.Tensor:
    """A1111's "Original" emphasis on (N, 77, D): scale each token, then (per chunk) restore the mean."""
    zf = z.float()
    scaled = zf * weights[..., None]
    if restore_mean:
        before = zf.mean(dim=(1, 2), keepdim=True)
        after = scaled.mean(dim=(1, 2), keepdim=True)
        ratio = torch.where(after == 0, torch.ones_like(after), before / torch.where(after == 0, 1.0, after))
        scaled = scaled * ratio
    return scaled.to(z.dtype)


def encode_weighted(family: str, tokenizers: list, text_encoders: list[torch.nn.Module], prompts: list[str], *,
                    clip_skip: int = 1, restore_mean: bool = True, min_chunks: int = 1,
                    device: torch.device | str | None = None) -> PromptEmbeds:
    """Encode A1111-weighted prompts: (B, 77 * chunks, D) hidden states (SDXL: both encoders side by
    side, pooled from the second encoder's first chunk). Layers as `text_encoding.encode_prompts`, so
    a prompt without weights and within 75 tokens gives exactly its result. The mean is restored per
    prompt and chunk (A1111 restores it over the batch: the same for one prompt) so each image can be
    remade alone. All prompts get the same number of chunks (at least `min_chunks`)."""
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (A1111 meaning: 1 = last layer), got {clip_skip}")
    device = device or text_encoders[0].device
    per_prompt = [weighted_chunks(tokenizers[0], p) for p in prompts]
    n_chunks = max([min_chunks] + [len(c) for c in per_prompt])
    for chunks in per_prompt:
        chunks.extend([([], [])] * (n_chunks - len(chunks)))

    hidden, pooled = [], None
    for k, (tok, te) in enumerate(zip(tokenizers, text_encoders)):
        ids, ws = [], []
        for prompt, chunks in zip(prompts, per_prompt):
            # the second SDXL tokenizer can differ from the first (pad token): re-tokenize with it
            own = chunks if k == 0 else _same_chunking(tok, prompt, n_chunks)
            for chunk_ids, chunk_w in own:
                full, w = _pad_chunk(tok, chunk_ids, chunk_w)
                ids.append(full)
                ws.append(w)
        ids_t = torch.tensor(ids, device=device)
        w_t = torch.tensor(ws, device=device, dtype=torch.float32)
        if family == "sdxl":
            out = te(ids_t, output_hidden_states=True)
            z = out.hidden_states[-(clip_skip + 1)]
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds.reshape(len(prompts), n_chunks, -1)[:, 0]
        elif clip_skip == 1:
            z = te(ids_t)[0]
        else:
            z = final_norm(te)(te(ids_t, output_hidden_states=True).hidden_states[-clip_skip])
        z = _emphasize(z, w_t, restore_mean)
        hidden.append(z.reshape(len(prompts), n_chunks * z.shape[1], z.shape[2]))
    return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


def _same_chunking(tokenizer, prompt: str, n_chunks: int) -> list[tuple[list[int], list[float]]]:
    chunks = weighted_chunks(tokenizer, prompt)
    if len(chunks) > n_chunks:
        raise ValueError("the two SDXL tokenizers split this prompt into different numbers of chunks")
    return chunks + [([], [])] * (n_chunks - len(chunks))


def count_chunks(tokenizer, prompt: str) -> int:
    """How many 75-token chunks the prompt takes (A1111 shows this as the token counter)."""
    return len(weighted_chunks(tokenizer, prompt))
