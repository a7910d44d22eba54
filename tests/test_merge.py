"""merge: LoRAs into the model's weights (checkpoint or folder) or into one LoRA, computed exactly."""

import pytest
import torch


@pytest.fixture(scope="module")
def two_loras(tiny_sd15_dir, concept_dir, tmp_path_factory):
    from helpers.config import TrainConfig
    from helpers.train.loop import train

    out = tmp_path_factory.mktemp("merge")
    paths = []
    for seed, rank in ((1, 4), (2, 2)):
        cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                          max_train_steps=2, train_batch_size=2, rank=rank, alpha=1.0, learning_rate=1e-2,
                          seed=seed, mixed_precision="no", output_dir=str(out / str(seed)), output_name=f"l{seed}",
                          save_precision="float")
        paths.append(train(cfg, progress=False).lora_path)
    return tiny_sd15_dir, paths, out


def by_hand(m) -> torch.Tensor:
    """alpha / rank * up @ down, over flattened kernels (what A1111 and ComfyUI add to the weight)."""
    return m.alpha / m.rank * (m.up.flatten(1).double() @ m.down.flatten(1).double())


def _weights(pipe):
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


def test_merging_into_the_model_adds_each_weighted_delta_exactly(two_loras):
    from helpers.formats.lora import load_lora
    from helpers.sd.models import load_base
    from helpers.toolbox.merge import merge_into_model

    base_dir, (a, b), _ = two_loras
    pipe = load_base(str(base_dir), dtype=torch.float32).pipe
    before = _weights(pipe)
    la, lb = load_lora(a, pipe)[0], load_lora(b, pipe)[0]
    assert merge_into_model(pipe, [(la, 0.8), (lb, -0.5)]) > 0
    after = _weights(pipe)
    name = next(iter(la["unet"]))
    key = f"{name}.weight"
    expected = before[key].double() + 0.8 * by_hand(la["unet"][name]).reshape(before[key].shape) \
        - 0.5 * by_hand(lb["unet"][name]).reshape(before[key].shape)
    assert torch.allclose(after[key].double(), expected, atol=1e-6)


def test_a_merged_checkpoint_and_folder_load_and_generate_as_the_lora_does(two_loras, tmp_path):
    from helpers.generate.inference import generate, load_loras
    from helpers.sd.models import load_base
    from helpers.toolbox.merge import merge_to_checkpoint

    base_dir, (a, _), _ = two_loras
    files = merge_to_checkpoint(str(base_dir), [(a, 1.0)], single_file=tmp_path / "m.safetensors",
                                diffusers_dir=tmp_path / "m_diffusers", dtype=torch.float32)
    assert [p.name for p in files] == ["m.safetensors", "m_diffusers"]
    with_lora = load_base(str(base_dir), dtype=torch.float32)
    load_loras(with_lora.pipe, [(a, 1.0)])
    import numpy as np

    kw = dict(steps=4, cfg_scale=5.0, seed=3, sampler="DDIM", family="sd1")

    def pixels(pipe):
        return np.asarray(generate(pipe, "a sks flower", **kw)[0][0], dtype=np.int16)

    ref = pixels(with_lora.pipe)
    merged = load_base(str(tmp_path / "m_diffusers"), dtype=torch.float32)
    assert np.abs(pixels(merged.pipe) - ref).max() <= 1          # the same image, up to 8-bit rounding
    single = load_base(str(tmp_path / "m.safetensors"), config=str(base_dir), dtype=torch.float32)
    assert np.abs(pixels(single.pipe) - ref).max() <= 1


def test_loras_merged_into_one_exactly_or_at_a_lower_rank(two_loras, tmp_path):
    from safetensors.torch import load_file

    from helpers.formats.lora import load_lora
    from helpers.sd.models import load_base
    from helpers.toolbox.merge import merge_loras

    base_dir, (a, b), _ = two_loras
    exact = merge_loras([(a, 0.7), (b, 0.3)], tmp_path / "one.safetensors", model=str(base_dir))
    pipe = load_base(str(base_dir), dtype=torch.float32).pipe
    la, lb, lm = (load_lora(p, pipe)[0] for p in (a, b, exact))
    name = next(iter(la["unet"]))
    want = 0.7 * by_hand(la["unet"][name]) + 0.3 * by_hand(lb["unet"][name])
    assert lm["unet"][name].rank == 6 and torch.allclose(by_hand(lm["unet"][name]), want, atol=1e-6)
    small = merge_loras([(a, 0.7), (b, 0.3)], tmp_path / "small.safetensors", model=str(base_dir), rank=2)
    sd = load_file(small)
    assert all(v.shape[0] == 2 for k, v in sd.items() if k.endswith(".lora_down.weight"))
