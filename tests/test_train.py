"""The trainer on tiny SD 1.5-like and SDXL-like models: the loss falls, runs reproduce, files reload exactly."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers.config import TrainConfig
from helpers.sd import notices
from helpers.train.log import read_log
from helpers.train.loop import train
from helpers.train.setup import resolve_mixed_precision


def make_cfg(base_dir, data_dir, out_dir, **overrides) -> TrainConfig:
    settings = dict(pretrained_model=str(base_dir), train_data_dir=str(data_dir), resolution=32,
                    enable_bucket=False, rank=4, alpha=2.0, target="full", learning_rate=2e-3,
                    train_batch_size=4, max_train_steps=30, mixed_precision="no", output_dir=str(out_dir),
                    output_name="t", log_every_n_steps=10, save_precision="float", seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def _val_losses(log_path):
    return [r["val_loss"] for r in read_log(log_path) if "val_loss" in r]


# The tiny SDXL has attention only in its two low-resolution blocks (the first block has none, as in
# real SDXL), so its LoRA moves the loss more slowly and gets twice the steps.
@pytest.mark.parametrize("family,steps,ratio", [("sd15", 40, 0.95), ("sdxl", 80, 0.97)])
def test_training_lowers_the_fixed_noise_loss(family, steps, ratio, tiny_sd15_dir, tiny_sdxl_dir, concept_dir,
                                               tmp_path):
    base = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    cfg = make_cfg(base, concept_dir, tmp_path, max_train_steps=steps, validation_every_n_steps=steps,
                   train_text_encoder=True, learning_rate=5e-3, alpha=4.0, log_every_n_steps=steps // 4)
    result = train(cfg, progress=False)
    before, after = _val_losses(result.log_path)
    assert after < ratio * before, (before, after)
    assert result.steps == steps and result.lora_path.exists()
    assert (tmp_path / "t.toml").exists()  # the config that made it, beside the LoRA
    rows = read_log(result.log_path)
    assert [r["step"] for r in rows if "loss" in r] == [steps // 4 * k for k in (1, 2, 3, 4)]
    assert all(r["step_time_s"] > 0 and r["lr"] == pytest.approx(5e-3) for r in rows if "loss" in r)


def test_same_seed_gives_identical_lora_files(tiny_sd15_dir, concept_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # fixes the date written into the metadata
    paths = []
    for run in ("a", "b"):
        cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path / run, max_train_steps=12, flip_aug=True,
                       shuffle_caption=True, caption_dropout_rate=0.2, noise_offset=0.05, min_snr_gamma=5.0,
                       save_precision="fp16")
        paths.append(train(cfg, progress=False).lora_path)
    with safe_open(paths[0], "pt") as f, safe_open(paths[1], "pt") as g:
        meta_diff = {k: (v, g.metadata().get(k)) for k, v in f.metadata().items() if g.metadata().get(k) != v}
        tensor_diff = [k for k in f.keys() if not torch.equal(f.get_tensor(k), g.get_tensor(k))]
    # Identical content: every tensor bit for bit and every metadata value (incl. the sshs_* hashes A1111
    # shows). Not the bytes: safetensors writes the metadata map in Rust HashMap order, which varies per write.
    assert not meta_diff and not tensor_diff, (meta_diff, tensor_diff[:3])
    other = train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "c", max_train_steps=12, seed=4), progress=False)
    with safe_open(paths[0], "pt") as f, safe_open(other.lora_path, "pt") as g:
        key = next(k for k in f.keys() if k.endswith("lora_up.weight"))
        assert not torch.equal(f.get_tensor(key), g.get_tensor(key))


def _images(pipe, seed=5):
    from helpers.generate.inference import generate

    images, _ = generate(pipe, "sks flower, on a black background", steps=4, cfg_scale=4.0, seed=seed,
                         sampler="DDIM", num_images=2)
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_lora_reproduces_the_trained_pipeline(family, tiny_sd15_dir, tiny_sdxl_dir, concept_dir, tmp_path):
    """Train, keep the in-memory pipeline; load each saved layout into a fresh pipeline: same images."""
    from helpers.generate.inference import load_loras
    from helpers.sd.models import load_base

    base_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    trained = load_base(str(base_dir))
    cfg = make_cfg(base_dir, concept_dir, tmp_path, max_train_steps=15, learning_rate=5e-3, alpha=3.0,
                   train_text_encoder=True, save_format="both")
    result = train(cfg, base=trained, progress=False)
    for m in (trained.unet, *trained.text_encoders):
        m.eval()
    want = _images(trained.pipe)

    plain = _images(load_base(str(base_dir)).pipe)
    assert np.abs(want - plain).max() > 1.0  # the LoRA changes the output (uint8 scale)

    for path in (result.lora_path, tmp_path / "t_diffusers"):
        fresh = load_base(str(base_dir))
        names = load_loras(fresh.pipe, [(path, 1.0)])
        got = _images(fresh.pipe)
        assert np.abs(got - want).max() <= 1.0, path  # uint8 images: at most one rounding step
        fresh.pipe.set_adapters(names, adapter_weights=[0.0])
        assert np.array_equal(_images(fresh.pipe), plain)  # weight 0 is the base model


def test_fp16_on_cpu_warns_and_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(notices, "WARNED", set())  # the warning is once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_mixed_precision("fp16", "cpu") == "no"
    assert any("fp16' needs a CUDA GPU" in str(w.message) for w in caught)
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"


def test_bf16_and_8bit_adamw_train_on_cpu(tiny_sd15_dir, concept_dir, tmp_path):
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, max_train_steps=6, mixed_precision="bf16",
                   optimizer="adamw8bit", log_every_n_steps=2, gradient_checkpointing=True,
                   gradient_accumulation_steps=2)
    result = train(cfg, progress=False)
    losses = [r["loss"] for r in read_log(result.log_path) if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
        assert meta["ss_mixed_precision"] == "bf16" and meta["ss_optimizer"] == "adamw8bit"
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float32  # save_precision="float"
    # the base model is named by its folder's name, as sd-scripts writes it: no local path leaves the machine
    assert meta["ss_sd_model_name"] == Path(tiny_sd15_dir).name
    assert not [k for k, v in meta.items() if str(Path(tiny_sd15_dir).parent) in v]


def test_saves_every_n_steps_and_keeps_the_last_n(tiny_sd15_dir, concept_dir, tmp_path):
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, max_train_steps=12, save_every_n_steps=3, save_last_n=2,
                   sample_every_n_steps=6, sample_prompts=["sks flower"], sample_steps=2)
    result = train(cfg, progress=False)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == ["t-step000006.safetensors", "t-step000009.safetensors", "t.safetensors"]
    assert all(p.exists() for p in result.saved)
    from helpers.formats.png_info import read_png_parameters

    samples = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["t_step000006_00.png", "t_step000012_00.png"]
    assert "Seed: 1234" in read_png_parameters(samples[0])


@pytest.mark.slow
def test_two_process_accelerate_launch_writes_one_lora(tiny_sd15_dir, concept_dir, tmp_path):
    from helpers.config import save_config

    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "out", max_train_steps=4, log_every_n_steps=2,
                   save_every_n_steps=2)
    config_path = save_config(cfg, tmp_path / "run.toml")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # `--cpu` with 2 processes needs mpirun in accelerate 1.15; `--multi_gpu` starts them with torchrun and,
    # on a machine without CUDA, the trainer's Accelerator(cpu=True) joins them in a gloo group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "helpers", "train", "--config", str(config_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-step000002.safetensors", "t.safetensors"]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("saved ") == 1  # only rank 0 reports (and writes) the LoRA


def test_loss_weights_min_snr_and_prior_weight():
    from helpers.train.step import loss_weights

    alphas = torch.tensor([0.99, 0.5, 0.01])  # snr = 99, 1, 1/99
    t = torch.tensor([0, 1, 2])
    none = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(loss_weights(t, alphas, none), torch.ones(3))
    eps = loss_weights(t, alphas, none, min_snr_gamma=5.0)
    assert torch.allclose(eps, torch.tensor([5 / 99, 1.0, 1.0]))  # only high-SNR (low-noise) steps are damped
    v = loss_weights(t, alphas, none, min_snr_gamma=5.0, prediction_type="v_prediction")
    assert torch.allclose(v, torch.tensor([5 / 100, 1 / 2, (1 / 99) / (1 / 99 + 1)]))
    cls = torch.tensor([False, True, True])
    assert torch.allclose(loss_weights(t, alphas, cls, prior_loss_weight=0.25), torch.tensor([1.0, 0.25, 0.25]))


def test_regularization_images_are_counted_and_weighted(tiny_sd15_dir, concept_dir, tmp_path):
    from helpers.toy.demo import write_reg_images

    reg = write_reg_images(tmp_path / "reg", n=4, seed=0)
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "out", max_train_steps=4, reg_data_dir=str(reg),
                   prior_loss_weight=0.5)
    result = train(cfg, progress=False)
    with safe_open(result.lora_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "24" and meta["ss_num_reg_images"] == "4"  # 12 images x 2 repeats
    assert meta["ss_prior_loss_weight"] == "0.5"
    import json

    assert list(json.loads(meta["ss_tag_frequency"])) == ["2_sks flower"]  # the reg images are left out


def test_training_twice_on_one_loaded_base_starts_from_the_plain_base(tiny_sd15_dir, concept_dir, tmp_path):
    """Notebooks reuse one BaseModel: a second run must not stack on the first run's LoRA."""
    from helpers.sd.models import load_base

    shared = load_base(str(tiny_sd15_dir))
    train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "first", max_train_steps=3, seed=1), base=shared,
          progress=False)
    second = train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "second", max_train_steps=3), base=shared,
                   progress=False)
    fresh = train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "fresh", max_train_steps=3), progress=False)
    with safe_open(second.lora_path, "pt") as f, safe_open(fresh.lora_path, "pt") as g:
        assert f.keys() == g.keys()
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
