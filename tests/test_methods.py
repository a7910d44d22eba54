"""DreamBooth and Textual Inversion (and pivotal tuning) through the one training loop, on tiny models."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers.config import ConfigError, TrainConfig
from helpers.sd.models import load_base
from helpers.train.loop import train

TOKEN = "<sks>"


def make_cfg(base_dir, data_dir, out_dir, **overrides) -> TrainConfig:
    settings = dict(pretrained_model=str(base_dir), train_data_dir=str(data_dir), resolution=32,
                    enable_bucket=False, train_batch_size=4, max_train_steps=6, mixed_precision="no",
                    output_dir=str(out_dir), output_name="m", log_every_n_steps=3, save_precision="float", seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def token_data(concept_dir, tmp_path_factory):
    """The concept set with the trigger written as a new token: '<sks> flower, ...'."""
    data = tmp_path_factory.mktemp("token_data") / "concept"
    shutil.copytree(concept_dir, data)
    for txt in data.rglob("*.txt"):
        txt.write_text(txt.read_text().replace("sks", TOKEN))
    return data


def _table(te) -> torch.Tensor:
    return te.get_input_embeddings().weight.detach().clone()


@pytest.mark.parametrize("family,vectors", [("sd15", 2), ("sdxl", 1)])
def test_textual_inversion_trains_only_the_new_rows(family, vectors, tiny_sd15_dir, tiny_sdxl_dir, token_data,
                                                    tmp_path):
    base_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    before = [_table(te) for te in load_base(str(base_dir)).text_encoders]
    base = load_base(str(base_dir))
    cfg = make_cfg(base_dir, token_data, tmp_path, method="textual_inversion", token_string=TOKEN,
                   init_word="flower", num_vectors_per_token=vectors, learning_rate=5e-2)
    result = train(cfg, base=base, progress=False)
    file = load_file(str(result.lora_path))
    keys = ["emb_params"] if family == "sd15" else ["clip_l", "clip_g"]
    assert sorted(file) == sorted(keys) and result.lora_path.name == "m.safetensors"
    for te, tok, old, key in zip(base.text_encoders, base.tokenizers, before, keys):
        table = _table(te)
        n_old = old.shape[0]
        assert torch.equal(table[:n_old], old)  # every existing row bit for bit
        ids = tok.convert_tokens_to_ids([TOKEN] + [f"{TOKEN}_{i}" for i in range(1, vectors)])
        assert ids == list(range(n_old, n_old + vectors))
        assert torch.equal(table[n_old:], file[key])  # the pipeline holds exactly the saved vectors
        init_ids = tok("flower", add_special_tokens=False).input_ids
        init = old[init_ids].mean(0)
        assert (file[key] - init).abs().max() > 1e-3  # they moved away from the init word
        assert file[key].shape == (vectors, old.shape[1])


def test_textual_inversion_file_loads_in_diffusers(tiny_sd15_dir, tiny_sdxl_dir, token_data, tmp_path):
    # SD 1.5, 2 vectors: diffusers' own loader reads the A1111 file and gets the same rows
    r = train(make_cfg(tiny_sd15_dir, token_data, tmp_path / "a", method="textual_inversion", token_string=TOKEN,
                       init_word="flower", num_vectors_per_token=2, max_train_steps=3), progress=False)
    fresh = load_base(str(tiny_sd15_dir)).pipe
    fresh.load_textual_inversion(str(r.lora_path), token=TOKEN)
    ids = fresh.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[ids].detach(), load_file(str(r.lora_path))["emb_params"])
    # SDXL: one call per encoder, as diffusers documents it
    r = train(make_cfg(tiny_sdxl_dir, token_data, tmp_path / "b", method="textual_inversion", token_string=TOKEN,
                       init_word="flower", max_train_steps=3), progress=False)
    sd = load_file(str(r.lora_path))
    fresh = load_base(str(tiny_sdxl_dir)).pipe
    fresh.load_textual_inversion(sd["clip_l"], token=TOKEN, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(sd["clip_g"], token=TOKEN, text_encoder=fresh.text_encoder_2,
                                 tokenizer=fresh.tokenizer_2)
    assert torch.equal(fresh.text_encoder_2.get_input_embeddings().weight[-1].detach(), sd["clip_g"][0])


def test_textual_inversion_needs_the_token_in_captions_and_a_new_word(tiny_sd15_dir, concept_dir, token_data,
                                                                      tmp_path):
    with pytest.raises(ConfigError, match="no caption contains token_string '<sks>'"):
        train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path, method="textual_inversion", token_string=TOKEN),
              progress=False)
    with pytest.raises(ValueError, match="already a word of this model's vocabulary"):
        train(make_cfg(tiny_sd15_dir, token_data, tmp_path, method="textual_inversion", token_string="a"),
              progress=False)
    with pytest.raises(ConfigError, match="train_text_encoder must be false for textual_inversion"):
        make_cfg(tiny_sd15_dir, token_data, tmp_path, method="textual_inversion", token_string=TOKEN,
                 train_text_encoder=True)


def test_pivotal_tuning_writes_one_file_with_the_token_bundled_as_a1111_reads_it(tiny_sd15_dir, token_data, tmp_path):
    from helpers.formats.lora import load_bundled_embeddings, load_lora
    from helpers.generate.inference import generate, load_loras

    r = train(make_cfg(tiny_sd15_dir, token_data, tmp_path, method="lora", rank=4, token_string=TOKEN,
                       init_word="flower", embedding_lr=5e-2, max_train_steps=3), progress=False)
    assert [p.name for p in r.saved] == ["m.safetensors"]          # one file
    sd = load_file(str(tmp_path / "m.safetensors"))
    assert sd[f"bundle_emb.{TOKEN}.string_to_param.*"].shape[0] == 1
    fresh = load_base(str(tiny_sd15_dir)).pipe
    weights, meta = load_lora(str(tmp_path / "m.safetensors"), fresh)
    assert weights["unet"] and meta["ss_network_dim"] == "4"
    bundled = load_bundled_embeddings(tmp_path / "m.safetensors")
    assert torch.equal(bundled[TOKEN]["single"], sd[f"bundle_emb.{TOKEN}.string_to_param.*"].float())
    load_loras(fresh, [(tmp_path / "m.safetensors", 1.0)])          # the LoRA and its token, in one call
    ids = fresh.tokenizer(TOKEN, add_special_tokens=False).input_ids
    assert len(ids) == 1 and torch.allclose(fresh.text_encoder.get_input_embeddings().weight[ids[0]],
                                            bundled[TOKEN]["single"][0])
    assert generate(fresh, f"a {TOKEN}", steps=2, seed=0, sampler="DDIM")[0]
    # the separate embedding file stays an option
    r2 = train(make_cfg(tiny_sd15_dir, token_data, tmp_path / "two", method="lora", rank=4, token_string=TOKEN,
                        init_word="flower", embedding_lr=5e-2, max_train_steps=1, embedding_file=True),
               progress=False)
    assert [p.name for p in r2.saved] == ["m.safetensors", "m_emb.safetensors"]
    assert load_file(str(tmp_path / "two" / "m_emb.safetensors"))["emb_params"].shape[0] == 1


def test_dreambooth_prior_loss_weight_falls_on_the_class_half_of_the_batch(tiny_sd15_dir):
    from helpers.train.step import DiffusionStep

    base = load_base(str(tiny_sd15_dir))
    sched = base.noise_scheduler()
    run = DiffusionStep(base.family, sched, base.tokenizers, base.text_encoders, torch.device("cpu"),
                        prior_loss_weight=0.25)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = torch.tensor([100, 300, 500, 700])
    batch = {"latents": latents, "captions": ["sks flower"] * 2 + ["a flower"] * 2,
             "is_class": torch.tensor([False, False, True, True])}
    with torch.no_grad():
        loss = run.loss(base.unet, batch, None, noise=noise, timesteps=t)
        emb = base.text_encoders[0](base.tokenizers[0](batch["captions"], padding="max_length",
                                                       max_length=base.tokenizers[0].model_max_length,
                                                       return_tensors="pt").input_ids)[0]
        pred = base.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    expected = (per[0] + per[1] + 0.25 * (per[2] + per[3])) / 4  # instance half at 1, class half at 0.25
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dreambooth_generates_class_images_and_its_single_file_reproduces_the_pipeline(tiny_sd15_dir, concept_dir,
                                                                                       tmp_path):
    from helpers.generate.inference import generate

    base = load_base(str(tiny_sd15_dir))
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, method="dreambooth", learning_rate=1e-4,
                   optimizer="adamw", class_prompt="a flower", num_class_images=4, save_format="both",
                   sample_steps=2)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    result = train(cfg, base=base, progress=False)
    assert len(list((tmp_path / "class_images").glob("*.png"))) == 4  # made with the base model first
    assert [p.name for p in result.saved] == ["m.safetensors", "m_diffusers"]
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)  # a full fine-tune: (nearly) every UNet tensor moved

    def images(pipe):
        ims, _ = generate(pipe, "sks flower", steps=3, cfg_scale=4.0, seed=1, sampler="DDIM", num_images=2)
        return np.stack([np.asarray(im, dtype=np.int16) for im in ims])

    trained = images(base.pipe)
    single = load_base(str(result.saved[0]), config=str(tiny_sd15_dir))  # offline, configs from a local folder
    folder = load_base(str(result.saved[1]))
    for name in ("unet", "text_encoder", "vae"):  # the round trip through the original layout is exact
        got, want = getattr(single.pipe, name).state_dict(), getattr(base.pipe, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert np.array_equal(images(single.pipe), trained)
    assert np.array_equal(images(folder.pipe), trained)
    assert not np.array_equal(images(load_base(str(tiny_sd15_dir)).pipe), trained)


def test_bundled_embedding_keys_for_both_families_round_trip():
    from helpers.formats.embedding import bundle_tensors, split_bundled

    sd1 = bundle_tensors("<sks>", {"emb_params": torch.ones(2, 8)}, "sd1")
    assert list(sd1) == ["bundle_emb.<sks>.string_to_param.*"]
    xl = bundle_tensors("<sks>", {"clip_l": torch.ones(2, 8), "clip_g": torch.zeros(2, 16)}, "sdxl")
    assert sorted(xl) == ["bundle_emb.<sks>.clip_g", "bundle_emb.<sks>.clip_l"]
    own, emb = split_bundled({**xl, "lora_unet_x.alpha": torch.tensor(1.0)})
    assert list(own) == ["lora_unet_x.alpha"] and emb["<sks>"]["clip_g"].shape == (2, 16)
    assert split_bundled(sd1)[1]["<sks>"]["single"].shape == (2, 8)
    with pytest.raises(ValueError, match="cannot hold a '.'"):
        bundle_tensors("a.b", {"emb_params": torch.ones(1, 8)}, "sd1")


def test_the_bundled_file_gives_the_image_of_the_two_file_form(tiny_sd15_dir, token_data, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from helpers.generate.inference import generate, load_embeddings, load_loras

    train(make_cfg(tiny_sd15_dir, token_data, tmp_path, method="lora", rank=4, token_string=TOKEN, init_word="flower",
                   embedding_lr=5e-2, max_train_steps=2, embedding_file=True), progress=False)
    sd = load_file(str(tmp_path / "m.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("bundle_emb.")}, str(tmp_path / "plain.safetensors"))
    one = load_base(str(tiny_sd15_dir)).pipe
    load_loras(one, [(tmp_path / "m.safetensors", 1.0)])
    two = load_base(str(tiny_sd15_dir)).pipe
    load_loras(two, [(tmp_path / "plain.safetensors", 1.0)])
    load_embeddings(two, [(tmp_path / "m_emb.safetensors", TOKEN)])
    kw = dict(steps=3, seed=4, sampler="DDIM")
    a, b = (np.asarray(generate(p, f"a {TOKEN} on a gray background", **kw)[0][0]) for p in (one, two))
    assert np.array_equal(a, b)
