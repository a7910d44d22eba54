"""extract: a fine-tuned model minus its base, as a LoRA that reproduces the difference."""

import pytest
import torch


@pytest.fixture(scope="module")
def tuned(tiny_sd15_dir, tmp_path_factory):
    """The tiny base with a known rank-2 change on two layers (one linear, one 3x3 conv)."""
    from helpers.sd.lora_targets import model_module_names
    from helpers.sd.models import load_base

    base = load_base(str(tiny_sd15_dir), dtype=torch.float32)
    names = model_module_names(base.pipe.unet)
    lin = next(n for n, m in names.items() if isinstance(m, torch.nn.Linear) and n.endswith("attn2.to_k"))
    conv = next(n for n, m in names.items() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                and "resnets" in n)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.no_grad():
        for n in (lin, conv):
            w = names[n].weight
            flat = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g) * 0.05
            deltas[n] = flat.reshape(w.shape)
            w += deltas[n]
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    base.pipe.save_pretrained(str(out), safe_serialization=True)
    return tiny_sd15_dir, out, lin, conv, deltas


def test_the_extracted_lora_reproduces_the_difference(tuned, tmp_path):
    from helpers.formats.lora import load_lora
    from helpers.sd.models import load_base
    from helpers.toolbox.extract import extract_lora

    base_dir, tuned_dir, lin, conv, deltas = tuned
    path, report = extract_lora(str(base_dir), str(tuned_dir), tmp_path / "x.safetensors", 2, conv_rank=2,
                                clamp_quantile=1.0, dtype=torch.float32)
    assert {(r.name, r.rank) for r in report} == {(lin, 2), (conv, 2)}     # only the changed layers
    assert all(r.fro_retained == pytest.approx(1.0, abs=1e-6) for r in report)
    weights, meta = load_lora(path, load_base(str(base_dir)).pipe)
    for n in (lin, conv):
        m = weights["unet"][n]
        got = (m.alpha / m.rank * (m.up.flatten(1).double() @ m.down.flatten(1).double())).reshape(deltas[n].shape)
        assert torch.allclose(got.float(), deltas[n], atol=1e-5)
    assert "extracted from tuned" in meta["ss_training_comment"]


def test_linear_only_by_default_and_clamping_bounds_the_factors(tuned, tmp_path):
    from safetensors.torch import load_file

    from helpers.toolbox.extract import extract_lora, factor_difference

    base_dir, tuned_dir, lin, conv, _ = tuned
    _, report = extract_lora(str(base_dir), str(tuned_dir), tmp_path / "y.safetensors", 1)
    assert [r.name for r in report] == [lin]            # no 3x3 conv without conv_rank
    sd = load_file(tmp_path / "y.safetensors")
    assert all(v.shape[0] == 1 for k, v in sd.items() if k.endswith("lora_down.weight"))
    diff = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    diff[0, 0] = 1e3                                     # one outlier
    m, _ = factor_difference(diff, 4, clamp_quantile=0.99)
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    raw = torch.cat([(u[:, :4] * s[:4]).flatten(), vh[:4].flatten()]).abs().float()
    hi = torch.quantile(raw, 0.99)
    assert raw.max() > hi                                 # the outlier's factors stood out ...
    assert max(m.up.abs().max(), m.down.abs().max()) <= hi + 1e-5   # ... and were clamped


def test_the_same_model_twice_has_nothing_to_extract(tuned, tmp_path, capsys):
    from helpers.__main__ import main

    base_dir = tuned[0]
    assert main(["extract", "--base", str(base_dir), "--tuned", str(base_dir), str(tmp_path / "z.safetensors"),
                 "--rank", "4"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
