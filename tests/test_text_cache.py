"""Cached text-encoder outputs: the same training as encoding every step, refused where captions change."""

import pytest
import torch

from helpers.config import ConfigError, TrainConfig


def test_the_cache_holds_what_the_encoders_give(tiny_sdxl_dir):
    from helpers.sd.models import load_base
    from helpers.sd.text_encoding import encode_prompts
    from helpers.train.step import DiffusionStep
    from helpers.train.text_cache import encode_all

    base = load_base(str(tiny_sdxl_dir))
    step = DiffusionStep("sdxl", base.noise_scheduler(), base.tokenizers, base.text_encoders, torch.device("cpu"))
    captions = ["a sks flower on a navy background", "a red circle", "a sks flower on a navy background"]
    step.text_cache = encode_all(step, captions)
    assert len(step.text_cache) == 2                      # each caption once
    with torch.no_grad():
        live = encode_prompts("sdxl", base.tokenizers, base.text_encoders, captions)
    got = step.cached(captions)
    assert torch.allclose(got.hidden, live.hidden, atol=1e-5) and torch.allclose(got.pooled, live.pooled, atol=1e-5)
    with pytest.raises(ValueError, match="is not in the text-encoder cache"):
        step.cached(["never seen"])


def test_settings_that_change_captions_are_refused_by_name():
    with pytest.raises(ConfigError, match="turn off: shuffle_caption, train_text_encoder"):
        TrainConfig(cache_text_encoder_outputs=True, shuffle_caption=True, caption_dropout_rate=0.1,
                    train_text_encoder=True)
    with pytest.raises(ConfigError, match="turn off: caption_tag_dropout_rate$"):
        TrainConfig(cache_text_encoder_outputs=True, caption_tag_dropout_rate=0.1)
    with pytest.raises(ConfigError, match="method=lora \\(new token vectors\\)"):   # pivotal tuning
        TrainConfig(cache_text_encoder_outputs=True, token_string="<x>", init_word="flower")
    with pytest.raises(ConfigError, match="method=textual_inversion"):
        TrainConfig(cache_text_encoder_outputs=True, method="textual_inversion", token_string="<x>",
                    init_word="flower")
    TrainConfig(cache_text_encoder_outputs=True, keep_tokens=1)   # fixed captions: fine
    TrainConfig(cache_text_encoder_outputs=True, caption_dropout_rate=0.1)   # a dropped caption is "": cached too


def test_the_cache_holds_each_caption_as_trained_and_the_empty_one_under_caption_dropout():
    from helpers.data.dataset import CaptionProcessor

    caption = "sks, flower ||| navy background\nsecond line"
    assert CaptionProcessor(keep_tokens_separator="|||").outcomes(caption) == ["sks, flower, navy background"]
    assert CaptionProcessor(dropout=0.3).outcomes(" a sks flower \nmore") == ["a sks flower", ""]
    with pytest.raises(ValueError, match="tag shuffle and tag dropout make a new caption every step"):
        CaptionProcessor(shuffle=True).outcomes("a, b")


@pytest.mark.parametrize("family,dropout", [("sd15", 0.0), ("sdxl", 0.0), ("sd15", 0.5)])
def test_a_cached_run_trains_exactly_as_an_encoding_one(family, dropout, tiny_sd15_dir, tiny_sdxl_dir, concept_dir,
                                                       tmp_path):
    from safetensors.torch import load_file

    from helpers.train.loop import train

    base = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    cfg = TrainConfig(pretrained_model=str(base), train_data_dir=str(concept_dir), resolution=32, max_train_steps=3,
                      train_batch_size=2, mixed_precision="no", output_dir=str(tmp_path / "plain"), output_name="t",
                      caption_dropout_rate=dropout)
    plain = load_file(train(cfg, progress=False).lora_path)
    cached_cfg = cfg.replace(output_dir=str(tmp_path / "cached"), cache_text_encoder_outputs=True,
                             cache_text_encoder_outputs_to_disk=True)
    cached = load_file(train(cached_cfg, progress=False).lora_path)
    assert plain.keys() == cached.keys()
    # the same training up to float rounding (captions are encoded in other batch shapes than the steps')
    diff = sum((plain[k].float() - cached[k].float()).norm() ** 2 for k in plain) ** 0.5
    assert diff / sum(plain[k].float().norm() ** 2 for k in plain) ** 0.5 < 1e-3
    files = list((tmp_path / "cached" / "text_cache").glob("*.safetensors"))
    assert len(files) == 1
    again = load_file(train(cached_cfg.replace(output_name="t2"), progress=False).lora_path)   # read from disk
    assert all(torch.equal(again[k], cached[k]) for k in cached)


def test_a_step_on_cached_text_has_exactly_the_loss_of_one_that_encodes(tiny_sd15_dir, concept_dir, tmp_path):
    """Same batch, same seed: bit-identical losses; and the encoders (and the fully cached VAE) are what the
    loop moves off the GPU."""
    from helpers.data.dataset import collate
    from helpers.train.setup import frozen_after_caching, setup
    from helpers.train.text_cache import encode_all

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      train_batch_size=2, mixed_precision="no", cache_text_encoder_outputs=True,
                      output_dir=str(tmp_path))
    run = setup(cfg, None, show_progress=False)
    batch = collate([run.dataset[0], run.dataset[3]])
    assert batch["captions"][0] != batch["captions"][1]
    step = run.step
    cache = step.text_cache
    step.text_cache = encode_all(step, batch["captions"], batch_size=2)   # the batch's own shape
    cached = step.loss(run.unet, batch, torch.Generator().manual_seed(5))
    step.text_cache = None
    plain = step.loss(run.unet, batch, torch.Generator().manual_seed(5))
    assert cached.item() == plain.item()
    step.text_cache = cache
    assert len(cache) == len({c for c in batch["captions"]} | set(cache))   # every dataset caption is there
    assert frozen_after_caching(run) == [*run.base.text_encoders, run.base.vae]
