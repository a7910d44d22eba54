"""TrainConfig: TOML round trip, and clear errors naming the field for bad values."""

import pytest

from helpers.config import ConfigError, TrainConfig, config_to_toml, load_config, save_config


def test_toml_round_trip_is_exact(tmp_path):
    cfg = TrainConfig(pretrained_model="stable-diffusion-v1-5/stable-diffusion-v1-5", train_data_dir="data",
                      rank=32, alpha=8.0, target="full", train_text_encoder=True, text_encoder_lr=5e-5,
                      optimizer="adamw8bit", lr_scheduler="cosine_with_restarts", lr_num_cycles=3,
                      min_snr_gamma=5.0, noise_offset=0.05, sample_every_n_steps=100,
                      sample_prompts=["sks flower", "a photo of sks flower, in a vase"], save_last_n=3,
                      mixed_precision="bf16", flip_aug=True, keep_tokens=1, shuffle_caption=True)
    path = save_config(cfg, tmp_path / "run.toml")
    assert load_config(path) == cfg
    assert "config_version = 1" in path.read_text()
    # no temp file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


def test_defaults_round_trip_and_none_fields_are_omitted(tmp_path):
    cfg = TrainConfig()
    text = config_to_toml(cfg)
    assert "text_encoder_lr" not in text  # None is left out: TOML has no null
    assert load_config(save_config(cfg, tmp_path / "d.toml")) == cfg


def test_ints_given_for_floats_are_accepted():
    assert TrainConfig(learning_rate=1, alpha=4).alpha == 4.0


BAD = [
    (dict(rank=0), "rank must be a positive integer, got 0"),
    (dict(rank=2.5), "rank must be an integer, got 2.5"),
    (dict(alpha=0), "alpha must be a number in (0.0, 1000000.0], got 0.0"),
    (dict(learning_rate=-1e-4), "learning_rate must be a number in (0.0, 10.0]"),
    (dict(optimizer="sgd"), "optimizer must be one of 'adamw', 'adamw8bit', 'prodigy', got 'sgd'"),
    (dict(lr_scheduler="step"), "lr_scheduler must be one of"),
    (dict(mixed_precision="fp8"), "mixed_precision must be one of 'auto', 'no', 'fp16', 'bf16', got 'fp8'"),
    (dict(resolution=500), "resolution must be a multiple of 8, got 500"),
    (dict(caption_dropout_rate=1.5), "caption_dropout_rate must be a number in [0.0, 1.0], got 1.5"),
    (dict(train_batch_size=0), "train_batch_size must be a positive integer, got 0"),
    (dict(target="everything"), "target must be one of 'attention', 'full', got 'everything'"),
    (dict(min_bucket_reso=1024, max_bucket_reso=512), "min_bucket_reso (1024) must not exceed max_bucket_reso (512)"),
    (dict(output_name="../x"), "output_name must be a plain file name"),
    (dict(sample_every_n_steps=100), "sample_prompts must list at least one prompt"),
    (dict(flip_aug="yes"), "flip_aug must be true or false, got 'yes'"),
    (dict(lr_warmup_steps=5000, max_train_steps=100), "lr_warmup_steps (5000) must not exceed max_train_steps (100)"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_bad_values_raise_errors_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kwargs)
    assert message in str(e.value)


def test_unknown_key_and_newer_version_are_rejected(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('config_version = 1\nrank = 8\nlearning_rte = 1e-4\n')
    with pytest.raises(ConfigError, match="unknown setting.*learning_rte"):
        load_config(p)
    p.write_text('config_version = 99\nrank = 8\n')
    with pytest.raises(ConfigError, match="newer version of helpers"):
        load_config(p)
    p.write_text('rank = \n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
