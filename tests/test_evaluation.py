"""Evaluation: metric values against hand-computed ones and against torchmetrics on the same tiny models,
metric models loaded from folders through the users' loaders, clear offline errors, and the whole protocol
on the toy model writing its report (table, plots, grids, report with relative links)."""

import csv
import json
import math
import re
import warnings

import pytest
import torch
from PIL import Image

from helpers.config import EvalConfig
from helpers.evaluate import metrics
from helpers.evaluate import protocol as ev
from helpers.evaluate import report as report_mod
from helpers.sd import prompts
from helpers.toy import eval as toy_eval
from helpers.toy import world
from helpers.toy.pretrain import SHIPPED_DIR

# ----------------------------------------------------------------------------------------- fixtures


class TinyFeatures(torch.nn.Module):
    """A stand-in for InceptionV3: uint8 (B,3,H,W) -> (B,8) features (a fixed random projection of a 4x4 pooling)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, 8, generator=g), requires_grad=False)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return pooled @ self.proj / 48 ** 0.5


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP (CLIPModel from a CLIPConfig, CLIP tokenizer, 32 px image processor) saved as a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from helpers.toy.tiny import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("metric_models") / "tiny_clip"
    write_clip_tokenizer(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(1)   # this init gives both signs of cosine on the test images
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(str(folder))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    proc.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    """A tiny ViT (ViTModel from a ViTConfig, no pooler, as DINO checkpoints) with a 32 px processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path_factory.mktemp("metric_models") / "tiny_dino"
    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def world_images(n, seed):
    return [im for im, _ in world.sample_world(n, seed)]


def concept_images(n, seed=7):
    rng = __import__("random").Random(seed)
    return [world.render(world.random_scene(rng, shape=world.CONCEPT_SHAPE)) for _ in range(n)]


# ----------------------------------------------------------------------------------------- pure metrics


def test_cosines_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    r = 1 / math.sqrt(2)
    assert torch.allclose(metrics.cosine_matrix(a, b), torch.tensor([[1.0, r], [0.0, r]], dtype=torch.float64))
    # CLIP-I / DINO: mean over all 4 (generated, reference) pairs = (1 + 0 + 2/sqrt 2) / 4
    assert metrics.mean_pairwise_cosine(a, b) == pytest.approx((1 + math.sqrt(2)) / 4, abs=1e-12)
    assert metrics.paired_cosine(a, b).tolist() == pytest.approx([1.0, r])


def test_fid_matches_the_closed_form_for_known_gaussians():
    mu1, mu2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 1.0]))
    # |mu1-mu2|^2 + tr(S1 + S2) - 2 tr((S1 S2)^1/2) = 5 + 10 - 2 (2 + 2) = 7
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-10)
    # non-commuting covariances: tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1 S2)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(5, dtype=torch.float64), b @ b.T
    m1, m2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    expected = float((m1 - m2) @ (m1 - m2) + s1.trace() + s2.trace()
                     - 2 * torch.linalg.eigvals(s1 @ s2).sqrt().real.sum())
    assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    # from features: 40,000 samples of each Gaussian estimate the closed form (7) closely
    x = torch.randn(40000, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0])
    y = torch.randn(40000, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0]) + torch.tensor([1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.fid_from_features(x, y) == pytest.approx(7.0, abs=0.1)
    with pytest.warns(metrics.FIDSampleSizeWarning, match="2,048"):
        metrics.fid_from_features(x[:100], y[:100])


def test_kid_hand_computed_polynomial_kernel_value():
    # k(x,y) = (x.y/2 + 1)^3. Off-diagonal k(x1,x2) = k(y1,y2) = 1; k(x,y): 3.375, 1, 3.375, 1 (sum 8.75)
    # MMD^2_u = 2/2 + 2/2 - 2 * 8.75 / 4 = -2.375
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(-2.375, abs=1e-12)
    k = metrics.kid_from_features(x, y)
    assert (k.mean, k.std, k.subset_size) == (pytest.approx(-2.375), 0.0, 2)
    with pytest.warns(UserWarning, match="larger than the smaller set"):
        assert metrics.kid_from_features(x, y, subset_size=5).subset_size == 2
    with pytest.raises(metrics.EvaluationError, match="at least 2"):
        metrics.kid_from_features(x[:1], y)


def test_kid_near_zero_for_identical_sets_and_larger_for_different_ones():
    ext = TinyFeatures()
    a, b = world_images(200, seed=1), concept_images(200)
    same = metrics.kid(a, a, ext, subset_size=100, subsets=20, seed=0)
    other = metrics.kid(a, b, ext, subset_size=100, subsets=20, seed=0)
    # measured: same -0.0026 (the unbiased estimator's O(1/n) noise), other 0.021 +- 0.003
    assert abs(same.mean) < 0.2 * other.mean and other.mean > 3 * other.std > 0
    assert same.subset_size == other.subset_size == 100 and same.subsets == 20


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_agree_with_torchmetrics_on_the_same_feature_network():
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    ext = TinyFeatures()
    gen, ref = world_images(20, seed=3), concept_images(20)
    tm_fid = FrechetInceptionDistance(feature=ext)
    tm_kid = KernelInceptionDistance(feature=ext, subset_size=20, subsets=1)
    for m in (tm_fid, tm_kid):
        m.update(metrics.images_to_uint8(ref), real=True)
        m.update(metrics.images_to_uint8(gen), real=False)
    with pytest.warns(metrics.FIDSampleSizeWarning):
        ours = metrics.fid(gen, ref, ext)
    assert ours > 0.01 and ours == pytest.approx(float(tm_fid.compute()), rel=1e-5)
    k = metrics.kid(gen, ref, ext)
    # torchmetrics keeps KID features in float32 (we use float64): agreement to 1e-4
    assert k.subset_size == 20 and k.mean > 0.01 and k.mean == pytest.approx(float(tm_kid.compute()[0]), rel=1e-4)


def test_clip_t_matches_torchmetrics_clipscore(tiny_clip_dir):
    tm = pytest.importorskip("torchmetrics.multimodal.clip_score")
    from transformers import CLIPModel, CLIPProcessor

    clip = metrics.load_clip(str(tiny_clip_dir))          # the loader users call, here with a folder
    images = world_images(6, seed=2)
    prompts = [f"a {s.colour} {s.shape} on a {s.background} background" for _, s in world.sample_world(6, 2)]
    ours = metrics.clip_t(clip, images, prompts)
    assert ours.clip_score == pytest.approx(max(100 * ours.cosine, 0.0))
    assert any(c > 0 for c in ours.per_image) and any(c < 0 for c in ours.per_image)

    # torchmetrics 1.9 takes only Hub ids containing "openai"/"jinaai"/"zer0int", not a folder ...
    with pytest.raises(ValueError, match="Invalid model_name_or_path"):
        tm.CLIPScore(model_name_or_path=str(tiny_clip_dir))

    # ... but accepts a callable returning (model, processor). With transformers 5 get_*_features return an
    # output object, which CLIPScore 1.9 cannot use; a thin wrapper hands it the projected features.
    class TensorFeatures(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *a, **k):
            return self.model.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.model.get_text_features(*a, **k).pooler_output

    model = TensorFeatures(CLIPModel.from_pretrained(str(tiny_clip_dir)).eval())
    processor = CLIPProcessor.from_pretrained(str(tiny_clip_dir))
    pixels = metrics.images_to_uint8(images)
    for i in range(len(images)):   # CLIPScore clamps the mean at 0: compare image by image
        metric = tm.CLIPScore(model_name_or_path=lambda: (model, processor))
        assert float(metric(pixels[i:i + 1], [prompts[i]]).detach()) == pytest.approx(max(100 * ours.per_image[i], 0.0),
                                                                              abs=1e-4)
    top = sorted(range(len(images)), key=lambda i: -ours.per_image[i])[:3]    # a batch with a positive mean
    sub = metrics.clip_t(clip, [images[i] for i in top], [prompts[i] for i in top])
    metric = tm.CLIPScore(model_name_or_path=lambda: (model, processor))
    assert sub.clip_score > 0 and float(metric(pixels[top], [prompts[i] for i in top]).detach()) == pytest.approx(
        sub.clip_score, abs=1e-4)


def test_clip_i_and_dino_load_from_folders_and_use_projected_and_cls_features(tiny_clip_dir, tiny_dino_dir):
    from transformers import CLIPModel, ViTImageProcessor, ViTModel

    gen, ref = world_images(3, seed=4), concept_images(2)
    clip = metrics.load_clip(str(tiny_clip_dir))
    dino = metrics.load_dino(str(tiny_dino_dir))
    assert dino.model.pooler is None   # DINO checkpoints have no pooler; none is invented

    raw = CLIPModel.from_pretrained(str(tiny_clip_dir))
    px = clip.processor(images=gen + ref, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = raw(pixel_values=px, input_ids=torch.tensor([[0]])).image_embeds   # normalized projections
    assert metrics.clip_i(clip, gen, ref) == pytest.approx(float((e[:3] @ e[3:].T).mean()), abs=1e-6)

    vit = ViTModel.from_pretrained(str(tiny_dino_dir), add_pooling_layer=False)
    px = ViTImageProcessor.from_pretrained(str(tiny_dino_dir))(images=gen + ref, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = torch.nn.functional.normalize(vit(pixel_values=px).last_hidden_state[:, 0], dim=-1)
    assert metrics.dino_similarity(dino, gen, ref) == pytest.approx(float((cls[:3] @ cls[3:].T).mean()), abs=1e-6)
    assert metrics.dino_similarity(dino, ref, ref) > metrics.dino_similarity(dino, gen, ref)


def test_missing_or_offline_metric_models_fail_with_clear_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(metrics.MetricModelError, match="does not exist"):
        metrics.load_clip(str(tmp_path / "no" / "such" / "clip"))
    with pytest.raises(metrics.MetricModelError, match="offline.*hf download"):
        metrics.load_dino("nobody-here/no-such-dino-model")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))   # no cached Inception weights
    with pytest.raises(metrics.MetricModelError, match=r"(?s)InceptionV3.*feature_extractor=.*fid_kid=False") as err:
        metrics.load_inception()
    assert "torch-fidelity" in str(err.value) or "offline" in str(err.value)
    with pytest.raises(metrics.MetricModelError):
        metrics.fid(world_images(2, 0), world_images(2, 1))   # no extractor given: the default one is needed


def test_trigger_removal_variants_and_seed_runs():
    assert prompts.remove_trigger("a sks flower on a gray background", "sks") == "a flower on a gray background"
    assert prompts.remove_trigger("sks, 1girl, smile", "sks") == "1girl, smile"
    assert prompts.remove_trigger("a photo of sksdog, sks", "sks") == "a photo of sksdog"
    assert prompts.has_trigger("a sks dog", "sks") and not prompts.has_trigger("a sksdog", "sks")
    vs = ev._variants(["a/run-000100.safetensors", "b/run-000200.safetensors"], [0.0, 0.5, 1.0])
    assert [v.label for v in vs] == ["base", "run-000100 @ 0.5", "run-000100 @ 1", "run-000200 @ 0.5",
                                     "run-000200 @ 1"]
    assert ev._seed_runs([0, 1, 2, 5, 6, 9], batch=2) == [(0, 2), (2, 1), (5, 2), (9, 1)]
    # bad prompt groups fail before any model is loaded
    with pytest.raises(metrics.EvaluationError, match="missing from concept prompt"):
        ev.run_protocol(EvalConfig(model="no/such-model", prompts=["a dog"], trigger="sks"))
    with pytest.raises(metrics.EvaluationError, match="prior prompts must not contain"):
        ev.run_protocol(EvalConfig(model="no/such-model", prompts=["a sks dog"], prior_prompts=["a sks cat"],
                                   trigger="sks"))


# ----------------------------------------------------------------------------------------- the protocol


@pytest.mark.skipif(not (SHIPPED_DIR / "model_index.json").exists() or not toy_eval.TOY_LORA.exists(),
                    reason="toy base model or toy LoRA missing")
def test_protocol_on_the_toy_model_writes_the_full_report(tmp_path, tiny_clip_dir, tiny_dino_dir):
    import matplotlib

    from helpers.formats.png_info import read_png_parameters

    backend = matplotlib.get_backend()
    out = tmp_path / "eval"
    with pytest.warns(metrics.FIDSampleSizeWarning):
        res = toy_eval.run_toy_protocol(out, [str(toy_eval.TOY_LORA)], weights=(0.5, 1.0), n_prompts=2, seeds=[0, 1], steps=4,
                                  n_reference=12, clip_model=str(tiny_clip_dir), dino_model=str(tiny_dino_dir),
                                  fid_kid=True, feature_extractor=TinyFeatures(), device="cpu", progress=False)
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in __import__("sys").modules:
        assert __import__("matplotlib.pyplot").pyplot.get_fignums() == []

    variants = ["base", "toy_concept @ 0.5", "toy_concept @ 1"]
    groups = ["natural", "new_context", "prior", "no_trigger"]
    judge_cols = ["judge_concept_rate", "judge_shape_acc", "judge_colour_acc", "judge_shape_and_colour_acc",
                  "judge_background_acc", "looks_concept_rate"]
    with open(res.csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == report_mod.BASE_COLUMNS + judge_cols == res.columns
    assert [(r["variant"], r["group"]) for r in table] == [(v, g) for v in variants for g in groups]
    for r in table:
        assert r["n"] == "4" and r["kid_subset"] == "4"     # 2 prompts x 2 seeds; KID subsets <= smaller set
        for c in ("clip_t", "clip_t_100", "clip_i", "dino", "kid_mean", "kid_std", "fid", "judge_concept_rate"):
            assert r[c] != "" and math.isfinite(float(r[c])), (r["variant"], r["group"], c)
        assert -1 <= float(r["clip_t"]) <= 1 and float(r["clip_t_100"]) == pytest.approx(
            max(100 * float(r["clip_t"]), 0), abs=1e-3)
        assert (r["base_dino"] == "") == (r["variant"] == "base")
    prior = {r["variant"]: r for r in table if r["group"] == "prior"}
    assert float(prior["toy_concept @ 0.5"]["base_dino"]) > 0.5    # LoRA at half weight keeps most of the prior
    nat = {r["variant"]: r for r in table if r["group"] == "natural"}
    # the toy judge sees the concept more often with the LoRA (measured: base 0.25, weight 1 0.75 at 4 steps)
    # and the base model draws the shapes its prior prompts ask for (measured 1.0)
    assert float(nat["toy_concept @ 1"]["judge_concept_rate"]) > float(nat["base"]["judge_concept_rate"])
    assert float(prior["base"]["judge_shape_acc"]) >= 0.75

    md = res.markdown_path.read_text()
    assert md.count("\n") == 2 + 12 and "| variant | lora | weight | group |" in md
    assert {p.name for p in res.plot_paths} == {"weights.png"}   # one LoRA at two weights: the bars would repeat it
    assert {p.name for p in res.grid_paths} == {f"{g}.png" for g in groups} | {"trigger.png"}
    for p in res.plot_paths + res.grid_paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200
    with Image.open(out / "grids" / "trigger.png") as trig, Image.open(out / "grids" / "natural.png") as nat:
        assert trig.size[0] > nat.size[0]   # 6 columns (each variant with and without the trigger) vs 3

    report = res.report_path.read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    for rel in ["plots/weights.png", "grids/trigger.png", "metrics.csv", "results.json"]:
        assert rel in links
    assert all((out / rel).exists() for rel in links) and not any(link.startswith("/") for link in links)
    assert "## Trigger-word test" in report and "judge_concept_rate" in report and "2,048" in report
    # the report opens with its verdict, computed from the pixel check on the strongest LoRA
    assert report.index("## Verdict") < report.index("## Settings") < report.index("## Metrics")
    assert res.verdict[0].startswith("The LoRA ") and "at toy_concept @ 1" in res.verdict[0]
    assert "`looks_concept_rate`" in res.verdict[0] and res.verdict[0] in report
    html_text = res.html_path.read_text()
    assert "src='grids/prior.png'" in html_text and "<table>" in html_text

    manifest = json.loads(res.manifest_path.read_text())
    assert len(manifest) == 3 * 4 * 2 * 2
    nat = next(e for e in manifest if e["variant"] == "toy_concept @ 1" and e["group"] == "natural" and e["seed"] == 1)
    params = read_png_parameters(out / nat["path"])
    assert params.startswith("a sks flower") and "Seed: 1" in params and "<lora:toy_concept:1>" in params
    results = json.loads(res.json_path.read_text())
    assert results["settings"]["prompts"]["no_trigger"][0] == "a flower on a black background"
    assert len(results["rows"]) == 12 and not list(out.rglob("*.tmp"))


def test_toy_prompt_groups_list_every_prompt_once():
    groups = toy_eval.toy_prompts(6)
    assert all(len(set(p)) == len(p) for p in groups.values())
    assert len(groups["natural"]) == 3 and len(groups["prior"]) == 6 and len(groups["new_context"]) == 6
