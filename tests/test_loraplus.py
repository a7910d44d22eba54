"""LoRA+ (loraplus_lr_ratio): the B matrices in their own optimizer group at ratio x the learning rate."""

import pytest

from helpers.config import ConfigError, TrainConfig


def test_the_b_matrices_get_ratio_times_the_learning_rate(tiny_sd15_dir, concept_dir, tmp_path):
    from helpers.train.setup import setup

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      train_batch_size=2, learning_rate=1e-4, text_encoder_lr=5e-5, train_text_encoder=True,
                      loraplus_lr_ratio=16.0, mixed_precision="no", output_dir=str(tmp_path))
    run = setup(cfg, None, show_progress=False)
    groups = run.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 16e-4, 5e-5, 80e-5])
    names = {id(p): n for model in (run.base.unet, run.base.text_encoders[0]) for n, p in model.named_parameters()}
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"] + groups[2]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"] + groups[3]["params"])
    assert sum(len(g["params"]) for g in groups) == len(run.update.params)
    assert "LoRA+ x16" in run.methods[0].describe()


def test_loraplus_is_for_lora_runs():
    with pytest.raises(ConfigError, match="is for LoRA training \\(method lora\\), not dreambooth: leave "
                                          "loraplus_lr_ratio empty"):
        TrainConfig(method="dreambooth", loraplus_lr_ratio=16.0)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be a number in \\(0.0, 1000.0\\]"):
        TrainConfig(loraplus_lr_ratio=0.0)
