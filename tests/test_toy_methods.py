"""The toy method comparison's settings and its in-world Textual Inversion concept."""

from helpers.toy import world
from helpers.toy.methods import TI_TOKEN, method_configs, write_in_world_dataset


def test_each_method_has_valid_settings_through_the_one_trainer(tmp_path):
    configs = method_configs(tmp_path)
    assert set(configs) == {"lora", "dreambooth", "textual_inversion", "textual_inversion_in_world"}
    assert configs["dreambooth"].method == "dreambooth" and configs["lora"].method == "lora"
    for name in ("textual_inversion", "textual_inversion_in_world"):
        cfg = configs[name]
        assert cfg.method == "textual_inversion" and cfg.token_string == TI_TOKEN and cfg.reg_data_dir is None
    # four vectors fit the toy tokenizer's 16 positions: "a" + 4 + "flower on a navy background" + BOS/EOS
    assert 1 + configs["textual_inversion"].num_vectors_per_token + 5 + 2 <= 16


def test_the_in_world_concept_is_named_only_by_the_new_token(tmp_path):
    folder = write_in_world_dataset(tmp_path / "d")
    captions = sorted(p.read_text().strip() for p in folder.glob("*.txt"))
    assert len(captions) == 24 and len(list(folder.glob("*.png"))) == 24
    assert all(c.startswith(f"a {TI_TOKEN} on a ") for c in captions)
    assert not any(w in c.split() for c in captions for w in ("cross", "yellow"))
    assert {c.split()[-2] for c in captions} == set(world.BACKGROUNDS)
