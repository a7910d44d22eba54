"""convert: kohya <-> diffusers/peft, both ways, alphas kept, readable by the loaders on the other side."""

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def trained(request, tiny_sd15_dir, tiny_sdxl_dir, concept_dir, tmp_path_factory):
    from helpers.config import TrainConfig
    from helpers.train.loop import train

    base = tiny_sd15_dir if request.param == "sd15" else tiny_sdxl_dir
    out = tmp_path_factory.mktemp(f"conv_{request.param}")
    cfg = TrainConfig(pretrained_model=str(base), train_data_dir=str(concept_dir), resolution=32, max_train_steps=2,
                      train_batch_size=2, rank=4, alpha=2.0, train_text_encoder=True, mixed_precision="no",
                      output_dir=str(out), output_name="k", save_precision="float")
    return base, train(cfg, progress=False).lora_path, out


def test_kohya_to_diffusers_and_back_is_exact(trained):
    from helpers.toolbox.convert import convert_lora

    base, kohya, out = trained
    folder = convert_lora(kohya, out / "as_diffusers", to="diffusers", model=str(base))
    back = convert_lora(folder, out / "back.safetensors", to="kohya", model=str(base))
    a, b = load_file(kohya), load_file(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)          # alphas included (`.alpha` keys)
    assert any(k.endswith(".alpha") and float(v) == 2.0 for k, v in b.items())


def test_the_converted_folder_loads_in_diffusers_with_the_same_effect(trained):
    from helpers.formats.lora import load_lora
    from helpers.sd.models import load_base
    from helpers.toolbox.convert import convert_lora

    base, kohya, out = trained
    folder = convert_lora(kohya, out / "for_diffusers", to="diffusers", model=str(base))
    pipe = load_base(str(base)).pipe
    pipe.load_lora_weights(str(folder), adapter_name="x")   # diffusers' own loader
    ours, _ = load_lora(kohya, pipe)
    theirs, _ = load_lora(folder, pipe)
    for comp in ours:
        for name, m in ours[comp].items():
            t = theirs[comp][name]
            assert torch.allclose(m.up @ m.down.reshape(m.down.shape[0], -1) * m.alpha / m.down.shape[0],
                                  t.up @ t.down.reshape(t.down.shape[0], -1) * t.alpha / t.down.shape[0])


def test_bad_requests_say_what_is_wrong(trained, tmp_path, capsys):
    from helpers.__main__ import main

    base, kohya, _ = trained
    assert main(["convert", str(kohya), str(kohya), "--to", "kohya", "--model", str(base)]) == 2
    assert "output path other than the input" in capsys.readouterr().err
