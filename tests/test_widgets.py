"""The notebook forms: widgets built from the config dataclasses, presets, validation messages, TOML."""

import dataclasses

import pytest

pytest.importorskip("ipywidgets")

from helpers.config import ConfigError, EvalConfig, GenerateConfig, TagConfig, TrainConfig, field_help, load_config
from helpers.config import PrepareConfig
from helpers.notebook.presets import PRESETS, default_preset, preset_values, presets_that_fit
from helpers.notebook.widgets import (
    caption_editor, eval_form, generate_form, prepare_form, tag_form, train_form
)


def test_every_field_of_every_config_has_a_widget_and_round_trips():
    values = {
        TrainConfig: TrainConfig(pretrained_model="m", train_data_dir="d", min_snr_gamma=5.0, vae="v",
                                 sample_every_n_steps=10, sample_prompts=["a sks dog", "a cat, sitting"],
                                 text_encoder_lr=5e-5, max_train_epochs=3, lr_warmup_steps=0),
        GenerateConfig: GenerateConfig(model="m", loras=["a.safetensors:0.6", "b.safetensors"], prompts=["x", "y"],
                                       width=640, grid_weights=[0.0, 0.25, 1.0]),
        EvalConfig: EvalConfig(model="m", weights=[0.5, 1.0], prompts=["p"], clip_model=None, reference_dir="r"),
        PrepareConfig: PrepareConfig(source="s", output_dir="o", crop="subject", min_size=100),
        TagConfig: TagConfig(captioner="wd14", blacklist=["bad"], remove=["watermark*"], replace=["a=b", "c d=e"],
                             trigger="sks", max_tags=20),
    }
    makers = {TrainConfig: train_form, GenerateConfig: generate_form, EvalConfig: eval_form,
              PrepareConfig: prepare_form, TagConfig: tag_form}
    for cls, cfg in values.items():
        form = makers[cls](cfg)
        assert set(form.fields) == {f.name for f in dataclasses.fields(cls)}
        assert form.value() == cfg, cls.__name__


def test_a_bad_value_shows_the_configs_own_message_naming_the_field():
    form = train_form(train_data_dir="d")
    form.fields["learning_rate"].widget.value = -1.0
    assert "learning_rate must be a number in (0.0, 10.0], got -1.0" in form.status.value
    with pytest.raises(ConfigError, match="learning_rate"):
        form.value()
    form.fields["learning_rate"].widget.value = 1e-4
    form.fields["min_snr_gamma"].widget.value = "five"
    assert "min_snr_gamma must be a number or empty (unset), got &#x27;five&#x27;" in form.status.value or \
        "min_snr_gamma must be a number or empty (unset), got 'five'" in form.status.value
    form.fields["min_snr_gamma"].widget.value = ""
    assert form.value().min_snr_gamma is None
    assert "settings are valid" in form.status.value
    form.fields["sample_every_n_steps"].widget.value = "100"
    assert "sample_prompts must list at least one prompt" in form.status.value


def test_presets_set_their_fields_and_switching_back_leaves_no_sdxl_setting_behind():
    form = train_form(preset="SDXL · T4", train_data_dir="data/prepared")
    cfg = form.value()
    assert (cfg.family, cfg.resolution, cfg.mixed_precision, cfg.optimizer, cfg.gradient_checkpointing,
            cfg.train_batch_size) == ("sdxl", 1024, "fp16", "adamw8bit", True, 1)
    assert cfg.vae == "madebyollin/sdxl-vae-fp16-fix" and cfg.train_data_dir == "data/prepared"
    form.preset_picker.value = "SD 1.5 · T4"   # what a user does in the dropdown
    cfg = form.value()
    assert (cfg.family, cfg.resolution, cfg.vae, cfg.max_bucket_reso) == ("sd1", 512, None, 1024)
    assert cfg.train_data_dir == "data/prepared"   # the user's own fields stay
    toy = train_form(preset="Toy (CPU, offline)").value()
    assert toy.pretrained_model.endswith("helpers/toy/base") and toy.resolution == 32


def test_the_preset_picker_never_names_a_preset_its_values_do_not_match():
    form = train_form(preset="Toy (CPU, offline)", train_data_dir="d")
    assert form.preset_picker.value == "Toy (CPU, offline)"     # folders are not preset settings
    form.fields["train_batch_size"].widget.value = 8
    assert form.preset_picker.value == "custom" and form.value().train_batch_size == 8
    form.fields["train_batch_size"].widget.value = 32            # back to the preset's value
    assert form.preset_picker.value == "Toy (CPU, offline)"
    form.preset_picker.value = "SD 1.5 · T4"
    assert form.value().resolution == 512 and form.preset_picker.value == "SD 1.5 · T4"
    prep = prepare_form(preset="Toy (32 px)")
    assert (prep.value().resolution, prep.preset_picker.value) == (32, "Toy (32 px)")
    assert prepare_form().preset_picker.value == "SD 1.5 (512)"   # the defaults are that preset
    prep.fields["resolution"].widget.value = 48
    assert prep.preset_picker.value == "custom"
    tags = tag_form(preset="keep my captions", trigger="")
    assert (tags.value().captioner, tags.preset_picker.value) == ("none", "keep my captions")


def test_a_form_prints_its_settings_as_text_for_readers_offline(capsys):
    form = prepare_form(preset="Toy (32 px)", source="in", output_dir="out")
    text = form.summary()
    assert text.splitlines()[0] == "preset: Toy (32 px)"
    assert "resolution = 32" in text and "source = 'in'" in text and "crop = " not in text  # defaults left out
    form.show()   # outside a notebook display() prints the widget's repr first
    assert capsys.readouterr().out.strip().endswith("\n" + text)


def test_every_preset_is_a_valid_train_config():
    for name in PRESETS:
        TrainConfig(train_data_dir="d", **preset_values(name))


def test_which_presets_fit_a_gpu():
    assert [p.name for p in presets_that_fit(None)] == ["Toy (CPU, offline)"]
    t4 = {p.name for p in presets_that_fit(15.0, (7, 5))}          # a T4: no bf16, so no A100 preset
    assert t4 == {"SD 1.5 · T4", "SDXL · T4", "Toy (CPU, offline)"}
    small = {p.name for p in presets_that_fit(8.0)}                 # an 8 GiB card: the T4 presets' estimates fit
    assert small == {"SD 1.5 · T4", "SDXL · T4", "Toy (CPU, offline)"}
    assert {"SD 1.5 · A100/H100", "SDXL · A100/H100"} <= {p.name for p in presets_that_fit(80.0, (8, 0))}
    assert default_preset(15.0, "sd1", (7, 5)) == "SD 1.5 · T4"
    assert default_preset(80.0, "sdxl", (8, 0)) == "SDXL · A100/H100"
    assert default_preset(None) == "Toy (CPU, offline)"


def test_save_writes_toml_the_cli_reads(tmp_path):
    form = train_form(preset="SD 1.5 · T4", train_data_dir="data", output_name="mine")
    path = tmp_path / "configs" / "train.toml"
    cfg = form.save(path)
    assert load_config(path) == cfg
    assert "saved to" in form.saved_to.value
    other = train_form()
    other.load(path)
    assert other.value() == cfg
    import argparse

    gen = generate_form(model="m", prompts=["a sks dog"], loras=["x.safetensors:0.7"])
    gen.save(tmp_path / "generate.toml")
    assert load_config(tmp_path / "generate.toml", GenerateConfig).lora_weights() == [("x.safetensors", 0.7)]
    # the CLI runs the saved settings: `generate --config` reads the same file
    args = argparse.Namespace(config=str(tmp_path / "generate.toml"), steps=3)
    from helpers.cli import config_from_args

    assert config_from_args(GenerateConfig, args) == load_config(tmp_path / "generate.toml", GenerateConfig).replace(
        steps=3)


def test_a_form_refuses_settings_it_does_not_have():
    with pytest.raises(ConfigError, match="no setting"):
        train_form(not_a_field=1)


def test_field_help_comes_from_the_dataclass_fields():
    helps = field_help(TrainConfig)
    assert helps["rank"].startswith("kohya: network_dim")
    assert field_help(GenerateConfig)["sampler"].startswith("AUTOMATIC1111 name")


def test_caption_editor_edits_saves_and_undoes(tmp_path):
    from PIL import Image

    from helpers.data import captions as C

    for i in range(5):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"sks, red, tag{i}\n")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.txt")}
    editor = caption_editor(tmp_path, page_size=2)
    assert len(editor.grid.children) == 2 and "page 1 of 3" in editor.status.value
    assert editor.status.value.startswith("images 1–2 of 5 ")   # what the page shows, not all five
    editor.turn(2)
    assert editor.status.value.startswith("images 5–5 of 5 &middot; page 3 of 3")
    editor.filter.value = "tag4"
    assert editor.visible() == ["img4.png"]
    assert editor.status.value.startswith("images 1–1 of 1 matching &#x27;tag4&#x27; (5 in all)") or \
        editor.status.value.startswith("images 1–1 of 1 matching 'tag4' (5 in all)")
    box = editor.grid.children[0].children[1].children[1]
    box.value = "sks, blue, tag4"   # typing in the box
    assert "<b>1</b> unsaved" in editor.status.value
    entry = editor.save()
    assert entry is not None and (tmp_path / "img4.txt").read_text().strip() == "sks, blue, tag4"
    assert editor.save() is None
    C.undo(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.txt")} == before


def test_generate_and_eval_configs_validate():
    with pytest.raises(ConfigError, match="sampler must be one of"):
        GenerateConfig(sampler="Euler b")
    with pytest.raises(ConfigError, match="width must be a multiple of 8"):
        GenerateConfig(width=500)
    with pytest.raises(ConfigError, match="grid_weights must be a list of numbers"):
        GenerateConfig(grid_weights=["a"])
    with pytest.raises(ConfigError, match="weights must list at least one"):
        EvalConfig(weights=[])
    assert GenerateConfig(grid_weights=[0, 1]).grid_weights == [0.0, 1.0]
    assert GenerateConfig(loras=["C:\\x.safetensors", "y.safetensors:-0.5"]).lora_weights() == [
        ("C:\\x.safetensors", 1.0), ("y.safetensors", -0.5)]


def test_tag_config_runs_the_same_edits_as_the_cli(tmp_path):
    from helpers.data.tagging import run_tag_config

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("1girl, watermark, red_hair, 1girl\n")
    with pytest.raises(ConfigError, match="replace entries must read OLD=NEW"):
        TagConfig(replace=["red_hair"])
    cfg = tag_form(remove=["water*"], replace=["red_hair=red hair"], dedupe=True, trigger="sks").value()
    run = run_tag_config(tmp_path, cfg)
    assert (tmp_path / "a.txt").read_text().strip() == "sks, 1girl, red hair" and run.entry is not None
    assert run_tag_config(tmp_path, cfg).entry is None   # nothing left to change


def test_the_sdxl_t4_preset_caches_text_and_latents_with_frozen_encoders():
    values = preset_values("SDXL · T4")
    cfg = TrainConfig(train_data_dir="d", **values)
    assert (cfg.mixed_precision, cfg.train_batch_size, cfg.gradient_checkpointing, cfg.optimizer) == \
        ("fp16", 1, True, "adamw8bit")
    assert cfg.cache_latents and cfg.cache_text_encoder_outputs and not cfg.train_text_encoder
    assert "cached text embeddings" in PRESETS["SDXL · T4"].about
