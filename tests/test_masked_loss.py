"""Masked loss: masks line up with their images through bucket crops and flips, and masked-out pixels do not count."""

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.config import TrainConfig
from helpers.data.dataset import ImageItem, TrainDataset
from helpers.train.step import per_sample_loss


def _pattern(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def test_the_mask_is_cropped_and_flipped_as_its_image(tmp_path):
    gray = _pattern(48, 32)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "a.png")     # the image is its own mask, in grey
    (tmp_path / "_masks").mkdir()
    Image.fromarray(gray).save(tmp_path / "_masks" / "a.png")
    ds = TrainDataset([ImageItem(tmp_path / "a.png", "x")], resolution=32, enable_bucket=False, flip=True,
                      mask_source=tmp_path / "_masks")
    for epoch in range(6):   # flipped in some epochs, not in others
        ds.set_epoch(epoch)
        ex = ds[0]
        image_gray = ((ex["pixel_values"][0] + 1) * 127.5).round()   # R channel = the grey value
        assert ex["mask"].shape == (1, 32, 32)
        assert torch.equal((ex["mask"][0] * 255).round(), image_gray)


def test_alpha_masks_and_images_without_masks(tmp_path):
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:, :16, 3] = 255                      # the left half is the subject
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")   # no transparency: counts everywhere
    ds = TrainDataset([ImageItem(tmp_path / "a.png", "x"), ImageItem(tmp_path / "b.png", "y")], resolution=32,
                      enable_bucket=False, mask_source="alpha")
    a, b = ds.example(0, augment=False)["mask"], ds.example(1, augment=False)["mask"]
    assert a[0, :, :16].min() == 1 and a[0, :, 16:].max() == 0
    assert torch.equal(b, torch.ones(1, 32, 32))


def test_masked_out_pixels_do_not_count():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :32] = 1                      # pixels: the left half; latents: the left 4 columns
    other = target.clone()
    other[..., 4:] += 10                       # change only what the mask hides
    for kind, c in (("l2", None), ("huber", torch.tensor([0.1]))):
        assert torch.equal(per_sample_loss(pred, target, kind, c, mask), per_sample_loss(pred, other, kind, c, mask))
    full = per_sample_loss(pred, target, "l2")
    half = ((pred - target)[..., :4] ** 2).sum() / pred.numel()
    assert torch.allclose(per_sample_loss(pred, target, "l2", None, mask), half.reshape(1))
    assert not torch.allclose(full, half)


def test_a_masked_run_trains_and_a_run_without_masks_is_refused(tiny_sd15_dir, tmp_path):
    from safetensors import safe_open

    from helpers.config import ConfigError
    from helpers.toy.world import write_concept_dataset
    from helpers.train.loop import train

    data = write_concept_dataset(tmp_path / "data", n=4)
    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(data), resolution=32,
                      max_train_steps=2, train_batch_size=2, masked_loss=True, mixed_precision="no",
                      output_dir=str(tmp_path / "out"), output_name="m")
    with pytest.raises(ConfigError, match="masked_loss needs masks: no mask folder at .*_masks"):
        train(cfg, progress=False)
    (data / "_masks").mkdir()
    for p in sorted(data.glob("*.png"))[:3]:
        Image.new("L", (32, 32), 255).save(data / "_masks" / p.name)
    with pytest.warns(UserWarning, match="1 of 4 images have no mask"):
        result = train(cfg, progress=False)
    with safe_open(str(result.lora_path), "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"


def test_latents_outside_the_mask_get_no_gradient_and_a_white_mask_is_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.ones(2, 1, 64, 64)
    mask[:, :, 32:, :] = 0                      # the bottom half of the pixels: latent rows 4-7
    per_sample_loss(pred, target, "l2", None, mask).sum().backward()
    assert pred.grad[..., 4:, :].abs().max() == 0 and pred.grad[..., :4, :].abs().min() > 0
    white = torch.ones(2, 1, 64, 64)
    assert torch.equal(per_sample_loss(pred, target, "l2", None, white), per_sample_loss(pred, target, "l2"))
