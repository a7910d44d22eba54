"""The command line builds the same TrainConfig as the notebooks and reports errors without tracebacks."""

import argparse

import pytest

from helpers.__main__ import main
from helpers.cli import config_from_args
from helpers.config import parse_lora_spec as _parse_lora
from helpers.config import TrainConfig, save_config


def _train_args(argv):
    parser = argparse.ArgumentParser()
    from helpers.cli import add_config_flags

    parser.add_argument("--config")
    add_config_flags(parser, TrainConfig)
    return parser.parse_args(argv)


def test_flags_override_the_toml_and_unset_flags_keep_it(tmp_path):
    path = save_config(TrainConfig(rank=32, alpha=16.0, flip_aug=True, learning_rate=3e-4), tmp_path / "c.toml")
    cfg = config_from_args(TrainConfig, _train_args(["--config", str(path), "--rank", "8", "--no-flip-aug",
                                          "--sample-prompts", "a", "b c", "--text-encoder-lr", "none"]))
    assert (cfg.rank, cfg.alpha, cfg.flip_aug, cfg.learning_rate) == (8, 16.0, False, 3e-4)
    assert cfg.sample_prompts == ["a", "b c"] and cfg.text_encoder_lr is None
    # underscore spellings (kohya's) work too
    assert config_from_args(TrainConfig, _train_args(["--max_train_steps", "7"])).max_train_steps == 7


def test_bad_flag_value_exits_2_with_the_field_named(capsys):
    assert main(["train", "--rank", "0", "--pretrained-model", "x", "--train-data-dir", "."]) == 2
    assert "rank must be a positive integer, got 0" in capsys.readouterr().err


def test_missing_data_folder_is_reported(capsys, tiny_sd15_dir):
    assert main(["train", "--pretrained-model", str(tiny_sd15_dir), "--train-data-dir", "/no/such/folder"]) == 2
    assert "train_data_dir '/no/such/folder' is not a folder" in capsys.readouterr().err


def test_train_then_generate_from_the_command_line(tiny_sd15_dir, concept_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--pretrained-model", str(tiny_sd15_dir), "--train-data-dir", str(concept_dir),
                 "--resolution", "32", "--no-enable-bucket", "--rank", "4", "--max-train-steps", "3",
                 "--train-batch-size", "2", "--output-dir", str(out), "--output-name", "cli", "--no-progress"]) == 0
    assert (out / "cli.safetensors").exists() and (out / "cli.toml").exists()
    assert main(["generate", "--model", str(tiny_sd15_dir), "--lora", f"{out / 'cli.safetensors'}:0.6",
                 "--prompt", "sks flower", "--steps", "2", "--num-images", "2", "--seed", "9",
                 "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    from helpers.formats.png_info import read_png_parameters

    text = read_png_parameters(tmp_path / "gen" / "000_10.png")
    assert text.splitlines()[0] == "sks flower <lora:cli:0.6>"
    assert "Seed: 10" in text and "Sampler: Euler a" in text and "Steps: 2" in text


@pytest.mark.parametrize("text,expected", [("a.safetensors", ("a.safetensors", 1.0)),
                                           ("dir/a.safetensors:0.5", ("dir/a.safetensors", 0.5)),
                                           ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0))])
def test_lora_weight_syntax(text, expected):
    assert _parse_lora(text) == expected


def test_resume_flag_alone_means_latest():
    assert config_from_args(TrainConfig, _train_args(["--resume"])).resume == "latest"
    resumed = config_from_args(TrainConfig, _train_args(["--resume", "out/states/t-step000100"]))
    assert resumed.resume == "out/states/t-step000100"
    assert config_from_args(TrainConfig, _train_args([])).resume is None


def test_prepare_then_tag_from_the_command_line(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "photos"
    src.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200), (0, 150, 0)]):
        im = Image.new("RGB", (96, 64), colour)
        im.paste((255, 255, 255), (10 + 20 * i, 10, 30 + 20 * i, 40))
        im.save(src / f"p{i}.jpg", quality=95)
        (src / f"p{i}.txt").write_text("flower, blurry, outdoors")
    (src / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "prepared"
    assert main(["prepare", "--source", str(src), "--output-dir", str(out), "--resolution", "64",
                 "--min-bucket-reso", "32", "--bucket-reso-steps", "32", "--min-size", "32", "--no-progress"]) == 0
    assert "broken.jpg" in capsys.readouterr().out  # the summary lists the rejected file
    assert sorted(p.name for p in out.glob("*.png")) == ["p0.png", "p1.png", "p2.png"]
    assert main(["tag", str(out), "--trigger", "sks", "--class-word", "flower", "--remove", "blur*"]) == 0
    assert (out / "p0.txt").read_text() == "sks, flower, outdoors"
    assert main(["tag", str(out), "--undo"]) == 0
    assert (out / "p0.txt").read_text() == "flower, blurry, outdoors"
    assert main(["prepare", "--source", str(src), "--output-dir", str(out), "--no-progress"]) == 2  # no --overwrite
    assert "overwrite" in capsys.readouterr().err


def test_evaluate_on_the_toy_world_from_the_command_line(tmp_path, capsys):
    assert main(["evaluate", "--toy", "--weights", "1", "--num-seeds", "1", "--steps", "2", "--out",
                 str(tmp_path / "eval"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "judge_concept_rate" in out and (tmp_path / "eval" / "report.md").is_file()
    assert main(["evaluate", "--model", "x"]) == 2
    assert "needs --model and at least one --prompt" in capsys.readouterr().err


@pytest.mark.parametrize("command,cls", [("prepare", "PrepareConfig"), ("tag", "TagConfig"), ("train", "TrainConfig"),
                                         ("generate", "GenerateConfig"), ("evaluate", "EvalConfig")])
def test_every_setting_is_a_flag_listed_once_with_its_help(command, cls, capsys):
    import dataclasses

    import helpers.config as config

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(getattr(config, cls)):
        shown = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        assert shown in text, shown
        if "_" in f.name:
            assert "--" + f.name not in text  # kohya's spelling is accepted, not listed
    if command == "train":
        assert "--max-train-steps INT" in text and "optimizer steps to train (default: 1600)" in " ".join(text.split())


def test_generate_and_evaluate_flags_come_from_their_configs():
    import argparse

    from helpers.cli import add_config_flags
    from helpers.config import EvalConfig, GenerateConfig

    parser = argparse.ArgumentParser()
    add_config_flags(parser, GenerateConfig)
    cfg = config_from_args(GenerateConfig, parser.parse_args(
        ["--model", "m", "--prompt", "a b", "--prompt", "c", "--lora", "x.safetensors:0.5", "--grid-weights", "0", "1",
         "--out", "o", "--num_images", "2"]))
    assert (cfg.prompts, cfg.loras, cfg.grid_weights, cfg.out_dir, cfg.num_images) == (
        ["a b", "c"], ["x.safetensors:0.5"], [0.0, 1.0], "o", 2)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, EvalConfig)
    cfg = config_from_args(EvalConfig, parser.parse_args(
        ["--model", "m", "--prompt", "a sks dog", "--kid-subsets", "10", "--clip-model", "none", "--no-fid-kid"]))
    assert (cfg.kid_subsets, cfg.clip_model, cfg.fid_kid, cfg.dino_model) == (10, None, False, "facebook/dino-vits16")


def test_a_choice_outside_the_list_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["tag", ".", "--captioner", "gpt"])
    assert "invalid choice: 'gpt'" in capsys.readouterr().err


def test_a_lora_weight_that_is_not_a_number_is_named():
    from helpers.config import ConfigError

    with pytest.raises(ConfigError, match=r"the LoRA weight in 'a.safetensors:abc' is not a number.*a.safetensors:0.8"):
        _parse_lora("a.safetensors:abc")
    with pytest.raises(ConfigError, match="finite"):
        _parse_lora("a.safetensors:nan")
    assert _parse_lora("run:2/a.safetensors") == ("run:2/a.safetensors", 1.0)  # a colon inside the path
