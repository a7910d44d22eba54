"""New token embeddings for Textual Inversion and pivotal tuning, and their A1111 file format.

A new token (e.g. "<sks>") gets `num_vectors` rows in each text encoder's embedding table, initialised
from an existing word. During training the rows live in a separate trainable parameter that a forward
hook substitutes into the embedding output, so the optimizer only sees the new vectors and every other
row of the table stays bit-for-bit unchanged (weight decay cannot touch them). `write_into_encoders`
copies the vectors into the table for inference.

File format (what A1111 and diffusers' `load_textual_inversion` read): SD 1.x/2.x `{"emb_params": (n, 768|1024)}`,
SDXL `{"clip_l": (n, 768), "clip_g": (n, 1280)}`, with `string_to_param`-style metadata.
"""

from __future__ import annotations

import re

import torch

# what A1111 calls the two SDXL encoders' embeddings
SDXL_KEYS = ("clip_l", "clip_g")


def token_names(token: str, num_vectors: int) -> list[str]:
    """The tokens that carry a multi-vector embedding: "tok", "tok_1", ... (diffusers' convention)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def token_pattern(token: str) -> re.Pattern:
    """`token` standing alone in a caption or prompt (not inside a longer word or another <token>)."""
    return re.compile(rf"(?<![\w<>]){re.escape(token)}(?![\w<>])")


def expand_token(text: str, token: str, num_vectors: int) -> str:
    """Replace each standalone `token` in a caption or prompt by all its vector tokens."""
    if num_vectors <= 1:
        return text
    return token_pattern(token).sub(" ".join(token_names(token, num_vectors)), text)


class NewTokenEmbeddings(torch.nn.Module):
    """Trainable vectors of one new token in each text encoder (one for SD 1.x/2.x, two for SDXL)."""

    def __init__(self, tokenizers: list, text_encoders: list[torch.nn.Module], token: str, init_word: str,
                 num_vectors: int = 1):
        super().__init__()
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"token_string must be one word without spaces, got {token!r}")
        if num_vectors < 1:
            raise ValueError(f"num_vectors_per_token must be >= 1, got {num_vectors}")
        self.token, self.num_vectors = token, num_vectors
        self.vectors = torch.nn.ParameterList()
        self.first_ids: list[int] = []
        self._encoders = list(text_encoders)
        self._hooks = []
        names = token_names(token, num_vectors)
        for tok, te in zip(tokenizers, text_encoders):
            existing = [n for n in names if n in tok.get_vocab() or n.lower() in tok.get_vocab()]
            if existing:
                raise ValueError(f"token_string {token!r} is already a word of this model's vocabulary "
                                 f"({existing[0]!r}): choose a new string, e.g. '<{token}>' or '{token}x'")
            init_ids = tok(init_word, add_special_tokens=False).input_ids if init_word else []
            if init_word and not init_ids:
                raise ValueError(f"init_word {init_word!r} tokenizes to nothing")
            added = tok.add_tokens(names)
            if added != len(names):
                raise ValueError(f"could not add {names} to the tokenizer (added {added})")
            ids = tok.convert_tokens_to_ids(names)
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise ValueError(f"the new tokens got non-consecutive ids {ids}")
            table = te.get_input_embeddings()
            old_rows = table.weight.shape[0]
            if ids[0] < old_rows:
                raise ValueError(f"new token id {ids[0]} is inside the embedding table ({old_rows} rows)")
            te.resize_token_embeddings(ids[-1] + 1)
            table = te.get_input_embeddings()
            with torch.no_grad():
                if init_ids:
                    init = table.weight[init_ids].float().mean(0)
                else:
                    init = table.weight[:old_rows].float().mean(0)
                start = init.unsqueeze(0).repeat(num_vectors, 1)
                table.weight[ids[0]:ids[-1] + 1] = start.to(table.weight.dtype)
            self.vectors.append(torch.nn.Parameter(start.clone()))
            self.first_ids.append(ids[0])
            self._hooks.append(table.register_forward_hook(self._make_hook(len(self.vectors) - 1)))

    def _make_hook(self, index: int):
        def hook(module, inputs, output):
            ids = inputs[0]
            first = self.first_ids[index]
            new = (ids >= first) & (ids < first + self.num_vectors)
            if not bool(new.any()):
                return output
            vectors = self.vectors[index].to(output.dtype)
            picked = vectors[(ids - first).clamp(0, self.num_vectors - 1)]
            return torch.where(new.unsqueeze(-1), picked, output)

        return hook

    def expand(self, text: str) -> str:
        return expand_token(text, self.token, self.num_vectors)

    @torch.no_grad()
    def write_into_encoders(self) -> None:
        """Copy the trained vectors into the embedding tables (for pipelines that run without the hook)."""
        for vec, first, te in zip(self.vectors, self.first_ids, self._encoders):
            table = te.get_input_embeddings()
            table.weight[first:first + self.num_vectors] = vec.detach().to(table.weight.dtype)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def file_tensors(self, family: str) -> dict[str, torch.Tensor]:
        """The A1111 layout of these vectors (fp32, CPU)."""
        vecs = [v.detach().float().cpu().contiguous() for v in self.vectors]
        if family == "sdxl":
            return dict(zip(SDXL_KEYS, vecs))
        return {"emb_params": vecs[0]}


