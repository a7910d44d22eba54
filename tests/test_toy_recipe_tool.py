"""tools/toy_recipe.py, the tool that tries a change to the toy recipe: its settings parse as a config file's
values, a misspelt field stops it before any training, and its scoring runs on the shipped demo LoRA."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "lora_files" / "toy_concept.safetensors"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("toy_recipe_tool", ROOT / "tools" / "toy_recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_parse_as_toml_values(tool):
    assert tool.parse_set(["rank=32", "learning_rate=2e-4", "train_text_encoder=true", "network=locon",
                           'lr_scheduler="constant"']) == {
        "rank": 32, "learning_rate": 2e-4, "train_text_encoder": True, "network": "locon", "lr_scheduler": "constant"}
    with pytest.raises(SystemExit, match="key=value"):
        tool.parse_set(["rank"])


def test_a_misspelt_field_stops_before_training(tool, tmp_path):
    with pytest.raises(SystemExit, match="not TrainConfig fields: rnak"):
        tool.main(["--set", "rnak=32", "--work", str(tmp_path / "w"), "--log", str(tmp_path / "log.jsonl")])
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(not LORA.exists(), reason="needs the demo's LoRA file")
def test_scoring_a_trained_file_writes_one_line_per_cfg(tool, tmp_path):
    log = tmp_path / "log.jsonl"
    rows = tool.main(["--lora", str(LORA), "--samples", "2", "--cfg", "3", "5", "--log", str(log)])
    assert [r["cfg"] for r in rows] == [3.0, 5.0]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == rows
    for r in rows:
        assert 0 <= r["violet_five_petal"] <= 1 and sum(r["lobes"].values()) == 2
    sys.modules.pop("toy_recipe_tool", None)
