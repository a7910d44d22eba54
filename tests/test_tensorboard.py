"""log_with = "tensorboard": the CSV log's records, as scalars, through accelerate's tracker."""

import pytest

from helpers.config import ConfigError, TrainConfig


def test_a_run_logs_its_records_to_tensorboard(tiny_sd15_dir, concept_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers.train.loop import train

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      max_train_steps=4, train_batch_size=2, log_every_n_steps=2, validation_every_n_steps=2,
                      log_with="tensorboard", mixed_precision="no", output_dir=str(tmp_path), output_name="tb")
    train(cfg, progress=False)
    runs = [p for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    assert runs, "no TensorBoard event file under output_dir/logs"
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "val_loss"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 2, 4]


def test_without_the_package_the_message_says_how_to_get_it(monkeypatch):
    import importlib.util

    from helpers.train.setup import tracker_settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    with pytest.raises(ConfigError, match="needs the tensorboard package: pip install tensorboard"):
        tracker_settings(TrainConfig(log_with="tensorboard"))
    assert tracker_settings(TrainConfig()) == {}
