"""The trainer's speed options (channels-last, torch.compile) change how the step runs, not what it computes:
same losses, same saved weights and key names, and every output format still saves and loads."""

import pytest
import torch
from safetensors.torch import load_file

from helpers.config import TrainConfig
from helpers.sd.models import load_base
from helpers.train.log import read_log
from helpers.train.loop import train


def make_cfg(base_dir, data_dir, out_dir, **overrides) -> TrainConfig:
    settings = dict(pretrained_model=str(base_dir), train_data_dir=str(data_dir), resolution=32,
                    enable_bucket=False, rank=4, alpha=2.0, target="full", learning_rate=2e-3,
                    train_batch_size=4, max_train_steps=4, mixed_precision="no", output_dir=str(out_dir),
                    output_name="t", log_every_n_steps=1, save_precision="float", seed=3, cache_latents=True)
    settings.update(overrides)
    return TrainConfig(**settings)


def _run(cfg):
    result = train(cfg, progress=False)
    return [r["loss"] for r in read_log(result.log_path)], load_file(str(result.lora_path))


def test_channels_last_trains_the_same_lora(tiny_sd15_dir, concept_dir, tmp_path):
    losses, lora = _run(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "plain"))
    losses_cl, lora_cl = _run(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "cl", channels_last=True))
    assert losses_cl == pytest.approx(losses, rel=1e-4)
    assert lora_cl.keys() == lora.keys()
    assert any(v.ndim == 4 for v in lora.values())  # conv (1x1 proj_in/out) LoRA layers are in it
    for k in lora:
        torch.testing.assert_close(lora_cl[k], lora[k], rtol=1e-2, atol=1e-4)  # Adam steps are lr=2e-3 each


def test_channels_last_dreambooth_saves_both_formats(tiny_sd15_dir, concept_dir, tmp_path):
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, method="dreambooth", learning_rate=1e-4,
                   save_format="both", max_train_steps=2, channels_last=True, output_name="m")
    result = train(cfg, progress=False)
    assert [p.name for p in result.saved] == ["m.safetensors", "m_diffusers"]
    folder = load_base(str(result.saved[1]))
    single = load_base(str(result.saved[0]), config=str(tiny_sd15_dir))
    for k, v in folder.unet.state_dict().items():
        assert torch.equal(single.unet.state_dict()[k], v)


@pytest.mark.slow
def test_torch_compile_trains_the_same_lora(tiny_sd15_dir, concept_dir, tmp_path):
    # aot_eager traces forward and backward as inductor does but generates no kernels: the same wrapping,
    # names and saves in seconds (inductor on the tiny UNet takes ~3 minutes of C++ compiling on 2 cores)
    from torch._dynamo.utils import counters

    losses, lora = _run(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "plain", max_train_steps=3))
    counters.clear()
    losses_c, lora_c = _run(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "compiled", max_train_steps=3,
                                     torch_compile=True, compile_backend="aot_eager"))
    assert counters["stats"]["unique_graphs"] >= 1  # the UNet did run compiled
    assert losses_c == pytest.approx(losses, rel=1e-3)
    assert lora_c.keys() == lora.keys()  # no "_orig_mod." in the names: the file is the same LoRA
    for k in lora:
        torch.testing.assert_close(lora_c[k], lora[k], rtol=1e-3, atol=1e-4)


def test_to_device_leaves_cpu_tensors_and_moves_to_other_devices():
    from helpers.sd.transfer import to_device

    t = torch.arange(6).reshape(2, 3)
    assert to_device(t, "cpu") is t
    moved = to_device(t, "meta")
    assert moved.device.type == "meta" and moved.shape == t.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_copies_to_the_gpu_without_a_sync():
    from helpers.sd.transfer import to_device

    ids = torch.randint(0, 1000, (8, 77))
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        on_gpu = to_device(ids, "cuda")
        with pytest.raises(RuntimeError, match="synchroniz"):
            ids.to("cuda")  # the plain pageable copy does synchronise: the check is live
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(on_gpu.cpu(), ids)


def test_loader_workers_only_where_they_pay():
    """Workers decode images beside a GPU; on a CPU they take a core from the step, with cached latents there is
    nothing to decode, and an epoch of few batches does not pay for starting them (they start each epoch)."""
    from helpers.config import ConfigError, TrainConfig
    from helpers.train.setup import loader_workers

    decode = TrainConfig(cache_latents=False)
    assert loader_workers(decode, "cpu", 100, cores=2) == 0
    assert loader_workers(decode, "cuda", 100, cores=2) == 1
    assert loader_workers(decode, "cuda", 100, cores=12) == 2
    assert loader_workers(decode, "cuda", 3, cores=12) == 0
    assert loader_workers(TrainConfig(cache_latents=True), "cuda", 100, cores=12) == 0
    assert loader_workers(decode.replace(max_data_loader_n_workers=4), "cpu", 1, cores=2) == 4
    import pytest

    with pytest.raises(ConfigError, match="max_data_loader_n_workers must be a whole number >= 0"):
        TrainConfig(max_data_loader_n_workers=-1)
