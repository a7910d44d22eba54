"""A held-out validation set: never trained on, its loss logged beside the training loss, the best step named."""

import csv

import pytest

from helpers.config import ConfigError, TrainConfig
from helpers.train.setup import split_validation


def _items(n):
    from types import SimpleNamespace

    return [SimpleNamespace(path=f"img{i}.png") for i in range(n)]


def test_the_split_is_by_seed_disjoint_and_leaves_images_to_train_on():
    cfg = TrainConfig(validation_split=0.25, seed=3, train_data_dir="d")
    train, held = split_validation(cfg, _items(12))
    assert len(held) == 3 and len(train) == 9
    assert not {i.path for i in train} & {i.path for i in held}
    again, held_again = split_validation(cfg, _items(12))
    assert [i.path for i in held_again] == [i.path for i in held]          # the same seed, the same split
    assert split_validation(cfg.replace(seed=4), _items(12))[1] != held
    assert split_validation(TrainConfig(train_data_dir="d"), _items(5)) == (_items(5), [])   # off by default
    assert len(split_validation(cfg.replace(validation_split=0.01), _items(3))[1]) == 1   # at least one
    with pytest.raises(ConfigError, match="needs at least 2 training images"):
        split_validation(cfg, _items(1))
    with pytest.raises(ConfigError, match="validation_split or validation_data_dir, not both"):
        TrainConfig(validation_split=0.1, validation_data_dir="v")


def test_a_run_validates_on_held_out_images_and_names_the_best_save(tiny_sd15_dir, concept_dir, tmp_path, capsys):
    from safetensors import safe_open

    from helpers.train.loop import train

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      max_train_steps=6, train_batch_size=2, log_every_n_steps=2, save_every_n_steps=2,
                      validation_split=0.25, output_dir=str(tmp_path), output_name="v", mixed_precision="no")
    assert cfg.validation_interval == 2     # with every log, as nothing else was asked
    result = train(cfg, progress=False)
    with open(result.log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    assert [s for s, _ in val] == [0, 2, 4, 6]          # the baseline, then every log
    step, loss = result.best_validation
    assert loss == min(v for s, v in val if s > 0) and step in (2, 4, 6)
    best = result.best_save()
    assert best is not None and best.exists()
    assert f"lowest validation loss {loss:.4f} at step {step}" in capsys.readouterr().out
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    # 12 images x 2 repeats in the concept folder: 3 of the 12 held out, so 9 x 2 samples trained on
    assert meta["ss_validation_split"] == "0.25" and meta["ss_num_train_images"] == "18"


def test_no_held_out_image_ever_reaches_a_training_batch(tiny_sd15_dir, concept_dir, tmp_path):
    from helpers.train.setup import setup

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      train_batch_size=3, validation_split=0.25, mixed_precision="no", output_dir=str(tmp_path))
    run = setup(cfg, None, show_progress=False)
    held = {str(i.path) for i in run.validation_set.items}
    assert len(held) == 3
    trained = set()
    for epoch in range(3):
        run.sampler.set_epoch(epoch)
        run.dataset.set_epoch(epoch)
        for batch in run.loader:
            trained |= {str(run.dataset.item_of(int(i)).path) for i in batch["index"]}
    assert trained and not trained & held and len(trained) == 9
