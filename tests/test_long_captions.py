"""Long captions (max_token_length 150 / 225): chunked as sd-scripts encodes them, for SD 1.x and SDXL."""

import pytest
import torch

from helpers.config import ConfigError, TrainConfig
from helpers.sd.text_encoding import chunk_ids, encode_prompts, join_chunks, tokenize


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_sd15_dir), subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(str(tiny_sd15_dir), subfolder="text_encoder").eval()
    return tok, te


LONG = ", ".join(f"tag{i} word{i}" for i in range(40))   # far over 75 tokens


def test_chunks_begin_with_bos_and_end_with_eos_or_padding(sd15):
    tok, _ = sd15
    n = len(tok(LONG, add_special_tokens=False).input_ids)
    assert n > 150
    ids = chunk_ids(tok, [LONG, "a sks flower"], chunks=2)
    assert ids.shape == (4, 77)
    body = tok(LONG, add_special_tokens=False).input_ids
    assert ids[0, 0] == tok.bos_token_id and ids[0, 1:76].tolist() == body[:75] and ids[0, 76] == tok.eos_token_id
    assert ids[1, 1:76].tolist() == body[75:150] and ids[1, 76] == tok.eos_token_id   # cut at 150 tokens
    # a short caption: its first chunk is exactly the 77-token tokenization, its second holds only EOS/padding
    assert torch.equal(ids[2], tokenize(tok, ["a sks flower"])[0])
    assert ids[3, 0] == tok.bos_token_id and set(ids[3, 1:].tolist()) <= {tok.eos_token_id, tok.pad_token_id}


def test_long_captions_see_their_tail_and_short_ones_keep_their_states(sd15):
    tok, te = sd15
    with torch.no_grad():
        short75 = encode_prompts("sd1", [tok], [te], ["a sks flower"]).hidden
        short150 = encode_prompts("sd1", [tok], [te], ["a sks flower"], max_token_length=150).hidden
        assert short75.shape == (1, 77, 32) and short150.shape == (1, 2 + 2 * 75, 32)
        # CLIP is causal: the first chunk's states are those of the plain encoding
        assert torch.allclose(short150[:, :76], short75[:, :76])
        tail_a, tail_b = LONG, LONG.replace("tag39", "zzz39")   # differ only after token 150
        mid_a, mid_b = LONG, LONG.replace("tag10 word10", "zzz10 word10")   # differ at token ~100
        enc = lambda c, m: encode_prompts("sd1", [tok], [te], [c], max_token_length=m).hidden  # noqa: E731
        assert torch.equal(enc(mid_a, 75), enc(mid_b, 75))          # 75 tokens: the difference is cut off
        assert not torch.allclose(enc(mid_a, 150), enc(mid_b, 150))  # 150: the caption's middle is seen
        assert len(tok(LONG).input_ids) > 227 and torch.equal(enc(tail_a, 225), enc(tail_b, 225))   # cut at 225
        assert enc(LONG, 225).shape == (1, 227, 32)
    with pytest.raises(ValueError, match="max_token_length must be one of"):
        encode_prompts("sd1", [tok], [te], ["x"], max_token_length=100)


def test_join_keeps_the_first_bos_every_chunks_inside_and_the_last_token():
    h = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(6, 5, 1)   # 2 captions x 3 chunks of 5 positions
    out = join_chunks(h, 2)
    assert out.shape == (2, 2 + 3 * 3, 1)
    assert out[0, :, 0].tolist() == [0, 1, 2, 3, 6, 7, 8, 11, 12, 13, 14]


def test_sdxl_long_captions_pool_the_first_chunk(tiny_sdxl_dir):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    toks = [CLIPTokenizer.from_pretrained(str(tiny_sdxl_dir), subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    tes = [CLIPTextModel.from_pretrained(str(tiny_sdxl_dir), subfolder="text_encoder").eval(),
           CLIPTextModelWithProjection.from_pretrained(str(tiny_sdxl_dir), subfolder="text_encoder_2").eval()]
    with torch.no_grad():
        plain = encode_prompts("sdxl", toks, tes, ["a sks flower", LONG])
        long = encode_prompts("sdxl", toks, tes, ["a sks flower", LONG], max_token_length=225)
    assert long.hidden.shape == (2, 227, 16 + 48) and long.pooled.shape == plain.pooled.shape == (2, 32)
    assert torch.allclose(long.pooled, plain.pooled, atol=1e-6)   # pooled from the first chunk, as sd-scripts


def test_the_setting_is_checked_trained_with_and_written_to_the_metadata(tiny_sd15_dir, concept_dir, tmp_path):
    from safetensors import safe_open

    from helpers.train.loop import train

    with pytest.raises(ConfigError, match="max_token_length must be 75, 150 or 225"):
        TrainConfig(max_token_length=77)
    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      max_train_steps=2, train_batch_size=2, max_token_length=150, output_dir=str(tmp_path),
                      output_name="long", mixed_precision="no")
    result = train(cfg, progress=False)
    with safe_open(str(result.lora_path), "pt") as f:
        assert f.metadata()["ss_max_token_length"] == "150"
    assert torch.isfinite(torch.tensor(result.final_loss))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_160_token_caption_trains_in_the_chunks_inference_prompts_it_in(family, tiny_sd15_dir, tiny_sdxl_dir):
    """Three chunks, each encoded as the inference path (A1111 chunking) encodes it; training then keeps the
    first BOS, every chunk's inside and the last token, as sd-scripts does."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from helpers.sd.prompt_weighting import encode_weighted

    folder = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    subs = ["tokenizer"] if family == "sd15" else ["tokenizer", "tokenizer_2"]
    toks = [CLIPTokenizer.from_pretrained(str(folder), subfolder=s) for s in subs]
    tes = [CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").eval()]
    if family == "sdxl":
        tes.append(CLIPTextModelWithProjection.from_pretrained(str(folder), subfolder="text_encoder_2").eval())
    caption = ", ".join(f"t{i}" for i in range(43))
    n = len(toks[0](caption, add_special_tokens=False).input_ids)
    assert 150 < n <= 225, n   # three chunks (160 tokens)
    fam = "sd1" if family == "sd15" else "sdxl"
    with torch.no_grad():
        trained = encode_prompts(fam, toks, tes, [caption], max_token_length=225)
        prompted = encode_weighted(fam, toks, tes, [caption])
    assert prompted.hidden.shape[1] == 3 * 77
    joined = join_chunks(prompted.hidden.reshape(3, 77, -1), 1)
    assert torch.allclose(trained.hidden, joined, atol=1e-5)
    if family == "sdxl":
        assert torch.allclose(trained.pooled, prompted.pooled, atol=1e-5)
