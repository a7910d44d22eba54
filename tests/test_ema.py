"""EMA of the trained weights: the average as its formula says, its own file, the samples, and exact resume."""

import pytest
import torch

from helpers.config import ConfigError, TrainConfig
from helpers.train.ema import Ema


def test_the_average_follows_its_formula_and_swaps_in_and_out():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = Ema({"m/w": p}, decay=0.9, warmup=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(1)
    assert torch.allclose(ema.shadow["m/w"], torch.full((3,), 0.1))    # 0.9 * 0 + 0.1 * 1
    ema.update(2)
    assert torch.allclose(ema.shadow["m/w"], torch.full((3,), 0.19))
    with ema.swapped():
        assert torch.allclose(p, torch.full((3,), 0.19))
    assert torch.equal(p.detach(), torch.ones(3))
    assert Ema({"m/w": p}, 0.999, warmup=True).decay_at(1) == pytest.approx(2 / 11)
    with pytest.raises(ConfigError, match="ema_decay must be a number in \\(0, 1\\)"):
        TrainConfig(ema_decay=1.0)


def test_a_run_writes_the_ema_file_and_resumes_it_exactly(tiny_sd15_dir, concept_dir, tmp_path):
    from safetensors.torch import load_file

    from helpers.train.loop import train

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      max_train_steps=6, train_batch_size=2, learning_rate=1e-3, ema_decay=0.8, ema_warmup=False,
                      mixed_precision="no", output_dir=str(tmp_path / "full"), output_name="e",
                      save_state_every_n_steps=3)
    full = train(cfg, progress=False)
    assert full.ema_path is not None and full.ema_path.name == "e_ema.safetensors"
    lora, ema = load_file(full.lora_path), load_file(full.ema_path)
    assert lora.keys() == ema.keys()
    assert any(not torch.equal(lora[k], ema[k]) for k in lora)      # the average is not the last step
    assert (full.states[0] / "ema.safetensors").exists()

    # stop at step 3, resume: the same EMA as the run that never stopped
    part = cfg.replace(output_dir=str(tmp_path / "part"), max_train_steps=3)
    train(part, progress=False)
    resumed = train(part.replace(max_train_steps=6), progress=False, resume=True)
    again = load_file(resumed.ema_path)
    assert all(torch.equal(again[k], ema[k]) for k in ema)
