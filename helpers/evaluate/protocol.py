"""Evaluate a LoRA the way DreamBooth-style theses do, with one call, and write the evidence.

Metrics: CLIP-T (prompt-image cosine), CLIP-I and DINO (mean pairwise cosine between generated and
training images), KID and FID (feature-distribution distances, InceptionV3 by default). The protocol
(`run_protocol`) samples the concept in its natural setting, in new contexts, prompts without the concept
(is the prior kept?) and the trigger-word test (same prompt and seed without the trigger), for the base model
and every LoRA at every weight, then writes a table (CSV, Markdown), plots, grids and a report.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..atomic import atomic_path, write_bytes, write_text
from ..sd.models import BaseModel, ModelLoadError, url_reachable
from ..sd.prompts import has_trigger, remove_trigger

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
# torch-fidelity's InceptionV3 (the TF FID network's weights), which torchmetrics' FID/KID use
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
FID_MIN_IMAGES = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

GROUPS = ("natural", "new_context", "prior", "no_trigger")
GROUP_TITLES = {"natural": "concept, natural setting", "new_context": "concept, new contexts",
                "prior": "no concept (prior)", "no_trigger": "natural prompts without the trigger"}
BASE_COLUMNS = ["variant", "lora", "weight", "group", "n", "clip_t", "clip_t_100", "clip_i", "dino",
                "base_clip_i", "base_dino", "kid_mean", "kid_std", "kid_subset", "fid"]
PLOT_METRICS = ["clip_t", "clip_i", "dino", "base_dino", "kid_mean"]


class EvaluationError(ValueError):
    """Evaluation inputs that cannot work (no prompts, a missing trigger, too few images); says what to change."""


class MetricModelError(ModelLoadError):
    """A metric model (CLIP, DINO, InceptionV3) cannot be loaded; the message says how to get it."""


class FIDSampleSizeWarning(UserWarning):
    """FID from fewer than 2,048 images per set: biased, compare only at equal sizes (or use KID)."""


# ------------------------------------------------------------------------------------ math on features

def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` with every row of `b` (float64, shape (len(a), len(b)))."""
    a = torch.nn.functional.normalize(torch.as_tensor(a).double(), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b).double(), dim=-1)
    return a @ b.T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """CLIP-I / DINO: the mean cosine over all (generated, reference) pairs."""
    return float(cosine_matrix(a, b).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of `a` with row i of `b` (CLIP-T per image, image vs base image)."""
    a = torch.nn.functional.normalize(torch.as_tensor(a).double(), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b).double(), dim=-1)
    return (a * b).sum(-1)


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with tr((S1 S2)^1/2) from the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2 (same spectrum; no scipy needed, stable for singular covariances)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t).double() for t in (mu1, mu2, sigma1, sigma2))
    s1h = _psd_sqrt(sigma1)
    m = s1h @ sigma2 @ s1h
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def _mean_cov(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.as_tensor(f).double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (f.shape[0] - 1)   # unbiased, as torchmetrics and pytorch-fid


def fid_from_features(generated: torch.Tensor, reference: torch.Tensor, *, warn: bool = True) -> float:
    """FID between two feature sets (N, D); warns (FIDSampleSizeWarning) below 2,048 images in either set."""
    n, m = len(generated), len(reference)
    if n < 2 or m < 2:
        raise EvaluationError(f"FID needs at least 2 images per set, got {n} generated and {m} reference")
    if warn and min(n, m) < FID_MIN_IMAGES:
        warnings.warn(fid_warning_text(n, m), FIDSampleSizeWarning, stacklevel=2)
    return frechet_distance(*_mean_cov(generated), *_mean_cov(reference))


def fid_warning_text(n: int, m: int) -> str:
    return (f"FID from {n} generated and {m} reference images: below {FID_MIN_IMAGES:,} images per set FID is "
            "strongly biased upwards and depends on the count, so compare FIDs only at equal counts; KID is "
            "unbiased at small counts.")


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef: float = 1.0) -> torch.Tensor:
    """KID's kernel k(x, y) = (gamma x.y + coef)^degree, gamma = 1/D by default."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                  coef: float = 1.0) -> float:
    """Unbiased squared MMD with the polynomial kernel (diagonals of k(x,x), k(y,y) left out)."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    m, n = len(x), len(y)
    kxx, kyy, kxy = (polynomial_kernel(a, b, degree, gamma, coef) for a, b in ((x, x), (y, y), (x, y)))
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


@dataclass
class KIDScore:
    mean: float
    std: float
    subset_size: int
    subsets: int


def kid_from_features(generated: torch.Tensor, reference: torch.Tensor, *, subset_size: int | None = None,
                      subsets: int = 100, degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                      seed: int = 0) -> KIDScore:
    """KID: unbiased MMD^2 over `subsets` random subsets of `subset_size` images from each set (at most the
    smaller set; default min(1000, both sizes)); mean and (population) std over subsets, as torchmetrics."""
    n, m = len(generated), len(reference)
    largest = min(n, m)
    if largest < 2:
        raise EvaluationError(f"KID needs at least 2 images per set, got {n} generated and {m} reference")
    if subset_size is None:
        subset_size = min(1000, largest)
    elif subset_size > largest:
        warnings.warn(f"KID subset size {subset_size} is larger than the smaller set ({largest} images); "
                      f"using {largest}", stacklevel=2)
        subset_size = largest
    if subset_size < 2:
        raise EvaluationError(f"KID subset size must be at least 2, got {subset_size}")
    g, r = torch.as_tensor(generated).double(), torch.as_tensor(reference).double()
    if subset_size == n == m:   # every subset is the whole set: one value, no spread
        return KIDScore(mmd2_unbiased(g, r, degree, gamma, coef), 0.0, subset_size, 1)
    gen = torch.Generator().manual_seed(seed)
    vals = torch.tensor([mmd2_unbiased(g[torch.randperm(n, generator=gen)[:subset_size]],
                                       r[torch.randperm(m, generator=gen)[:subset_size]], degree, gamma, coef)
                         for _ in range(subsets)], dtype=torch.float64)
    return KIDScore(float(vals.mean()), float(vals.std(unbiased=False)), subset_size, subsets)


# ------------------------------------------------------------------------------------ metric models

def _hub_offline(source: str, local_files_only: bool | None) -> bool:
    """Whether loading `source` must stay in the local cache (False for folders: no Hub involved)."""
    from ..sd.models import _use_local_files_only

    return False if Path(source).expanduser().exists() else _use_local_files_only(local_files_only)


def _from_pretrained(cls, source: str, what: str, offline: bool, **kwargs):
    """`cls.from_pretrained` for a local folder or a Hub id, with errors a user can act on."""
    from ..sd.models import _offline_by_env

    path = Path(source).expanduser()
    if path.exists():
        try:
            return cls.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as e:
            raise MetricModelError(f"{path} is not a loadable {what} folder ({str(e).splitlines()[0][:200]}). It "
                                   f"needs the files save_pretrained writes (config.json, weights, processor "
                                   f"files).") from None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise MetricModelError(f"{what} folder {source!r} does not exist")
    try:
        return cls.from_pretrained(source, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as e:
        if offline:
            why = "HF_HUB_OFFLINE=1" if _offline_by_env() else "no network"
            raise MetricModelError(
                f"Cannot load the {what} {source!r}: this machine is offline ({why}) and it is not in the local "
                f"Hugging Face cache. Download it where there is network (`hf download {source} --local-dir "
                f"<folder>`) and pass the folder, or skip this metric (None).") from None
        raise MetricModelError(f"Cannot load the {what} {source!r}: {str(e).splitlines()[0][:300]}") from None


def _embeddings(out: Any) -> torch.Tensor:
    """transformers 5's get_*_features return an output object (projected features in pooler_output)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def _embed_images(metric_model, images: Sequence[Image.Image], batch_size: int,
                  embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run `embed` on the processor's pixel values, batch by batch; float32 CPU rows, one per image."""
    out = []
    device = _device_of(metric_model.model)
    for i in range(0, len(images), batch_size):
        px = metric_model.processor(images=_rgb(images[i:i + batch_size]), return_tensors="pt")["pixel_values"]
        out.append(embed(px.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class ClipModel:
    """A CLIP model and its processor: image and text embeddings (projected, not normalized)."""

    model: Any
    processor: Any
    source: str

    def to(self, device: str | torch.device) -> ClipModel:
        self.model.to(device)
        return self

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        return _embed_images(self, images, batch_size,
                             lambda px: _embeddings(self.model.get_image_features(pixel_values=px)))

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        dev = _device_of(self.model)
        for i in range(0, len(texts), batch_size):
            tok = self.processor(text=list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                                 truncation=True)
            out.append(_embeddings(self.model.get_text_features(
                input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)


@dataclass
class DinoModel:
    """A self-supervised ViT (DINO): image embeddings are the final CLS token, as in DreamBooth's DINO metric."""

    model: Any
    processor: Any
    source: str

    def to(self, device: str | torch.device) -> DinoModel:
        self.model.to(device)
        return self

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        return _embed_images(self, images, batch_size, lambda px: self.model(pixel_values=px).last_hidden_state[:, 0])


def load_clip(source: str = DEFAULT_CLIP, *, device: str = "cpu", local_files_only: bool | None = None) -> ClipModel:
    """CLIP for CLIP-T and CLIP-I from a Hub id or a local folder (CLIPModel + its processor), in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    offline = _hub_offline(source, local_files_only)
    model = _from_pretrained(CLIPModel, source, "CLIP model", offline)
    processor = _from_pretrained(CLIPProcessor, source, "CLIP processor", offline)
    return ClipModel(model.eval().requires_grad_(False), processor, str(source)).to(device)


def load_dino(source: str = DEFAULT_DINO, *, device: str = "cpu", local_files_only: bool | None = None) -> DinoModel:
    """DINO ViT (default ViT-S/16) from a Hub id or a local folder, with its image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTModel

    offline = _hub_offline(source, local_files_only)
    config = _from_pretrained(AutoConfig, source, "DINO model config", offline)
    if getattr(config, "model_type", "") == "vit":   # DINO checkpoints have no pooler: do not build a random one
        model = _from_pretrained(ViTModel, source, "DINO model", offline, add_pooling_layer=False)
    else:
        model = _from_pretrained(AutoModel, source, "DINO model", offline)
    processor = _from_pretrained(AutoImageProcessor, source, "DINO image processor", offline)
    return DinoModel(model.eval().requires_grad_(False), processor, str(source)).to(device)


def inception_weights_path() -> Path:
    """Where torch.hub caches the InceptionV3 FID weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def load_inception(weights: str | None = None, *, device: str = "cpu") -> torch.nn.Module:
    """torchmetrics' InceptionV3 for FID/KID (torch-fidelity's weights, 2048 pool features): uint8 (B,3,H,W)
    images -> (B, 2048). The weights download once to the torch hub cache; `weights` is a local copy."""
    from ..sd.models import _offline_by_env

    problems: list[str] = []
    inception_cls = None
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if _TORCH_FIDELITY_AVAILABLE:
            inception_cls = NoTrainInceptionV3
        else:
            problems.append("torch-fidelity is not installed (`pip install torch-fidelity`; it needs the "
                            "torchvision build that matches your torch, which Colab has)")
    except ImportError as e:
        problems.append(f"torchmetrics is not installed or incomplete ({e}); `pip install torchmetrics torch-fidelity`")
    except Exception as e:  # torch-fidelity over a torchvision built for another torch fails at import
        problems.append(f"importing torchmetrics/torch-fidelity failed ({type(e).__name__}: {str(e)[:160]}): "
                        "torchvision probably does not match torch; reinstall the torchvision built for your torch")
    path = Path(weights).expanduser() if weights else inception_weights_path()
    if weights and not path.is_file():
        problems.append(f"inception_weights {path} does not exist")
    elif not path.is_file() and (_offline_by_env() or not url_reachable(INCEPTION_URL)):
        problems.append(f"its weights are not cached at {path} and this machine is offline: download "
                        f"{INCEPTION_URL} where there is network and put it there (or pass inception_weights=)")
    if problems:
        raise MetricModelError("FID/KID with the default InceptionV3 cannot run: " + "; ".join(problems) + ". "
                               "Alternatives: feature_extractor=<a module mapping uint8 (B,3,H,W) images to "
                               "(B,D) features>, or fid_kid=False to skip FID and KID.")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(path) as tmp:
                torch.hub.download_url_to_file(INCEPTION_URL, str(tmp), progress=True)
        except Exception as e:
            raise MetricModelError(f"downloading the InceptionV3 weights from {INCEPTION_URL} failed ({e}); "
                                   f"download the file by hand to {path} or pass inception_weights=") from None
    try:  # torch-fidelity unpickles without weights_only; check first that the file is plain tensors
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricModelError(f"{path} is not a plain state dict of tensors ({type(e).__name__}); refusing to "
                               "unpickle it. Download the weights again from " + INCEPTION_URL) from None
    net = inception_cls(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    return net.to(device)


# ------------------------------------------------------------------------------------ metrics on images

def images_to_uint8(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL images -> uint8 (B,3,H,W), all resized (Lanczos) to `size` (w, h; default the first image's)."""
    import numpy as np

    images = _rgb(images)
    size = size or images[0].size
    arrays = [np.asarray(im if im.size == size else im.resize(size, Image.LANCZOS), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def image_features(extractor: Callable[[torch.Tensor], Any], images: Sequence[Image.Image], *,
                   batch_size: int = 32, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Features (N, D) float64 of `images` from a FID/KID extractor taking uint8 (B,3,H,W) batches."""
    if not images:
        return torch.zeros(0, 0, dtype=torch.float64)
    size = size or _rgb(images[:1])[0].size
    dev = _device_of(extractor)
    out = []
    for i in range(0, len(images), batch_size):
        f = extractor(images_to_uint8(images[i:i + batch_size], size).to(dev))
        f = f[0] if isinstance(f, (tuple, list)) else f
        out.append(f.reshape(f.shape[0], -1).double().cpu())
    return torch.cat(out)


@dataclass
class ClipTScore:
    """CLIP-T: `cosine` is the raw mean cosine; `clip_score` is torchmetrics' CLIPScore scale, 100*max(mean, 0)."""

    cosine: float
    clip_score: float
    per_image: list[float]


def clip_t(clip: ClipModel, images: Sequence[Image.Image], prompts: Sequence[str]) -> ClipTScore:
    """CLIP-T: cosine between each image and its prompt (one prompt per image)."""
    if len(images) != len(prompts):
        raise EvaluationError(f"CLIP-T needs one prompt per image, got {len(images)} images, {len(prompts)} prompts")
    per = paired_cosine(clip.image_embeds(images), clip.text_embeds(prompts))
    mean = float(per.mean())
    return ClipTScore(mean, max(100.0 * mean, 0.0), [float(v) for v in per])


def clip_i(clip: ClipModel, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """CLIP-I: mean cosine over all (generated, training image) pairs of CLIP image embeddings."""
    return mean_pairwise_cosine(clip.image_embeds(images), clip.image_embeds(references))


def dino_similarity(dino: DinoModel, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """DINO: mean cosine over all (generated, training image) pairs of DINO CLS embeddings."""
    return mean_pairwise_cosine(dino.image_embeds(images), dino.image_embeds(references))


def kid(images: Sequence[Image.Image], references: Sequence[Image.Image],
        feature_extractor: Callable | None = None, *, subset_size: int | None = None, subsets: int = 100,
        seed: int = 0) -> KIDScore:
    """KID between generated and reference images (InceptionV3 features unless `feature_extractor` is given)."""
    ext = feature_extractor if feature_extractor is not None else load_inception()
    size = _rgb(images[:1])[0].size if images else None
    return kid_from_features(image_features(ext, images, size=size), image_features(ext, references, size=size),
                             subset_size=subset_size, subsets=subsets, seed=seed)


def fid(images: Sequence[Image.Image], references: Sequence[Image.Image],
        feature_extractor: Callable | None = None) -> float:
    """FID between generated and reference images; warns below 2,048 images per set."""
    ext = feature_extractor if feature_extractor is not None else load_inception()
    size = _rgb(images[:1])[0].size if images else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FIDSampleSizeWarning)
        value = fid_from_features(image_features(ext, images, size=size), image_features(ext, references, size=size))
    if min(len(images), len(references)) < FID_MIN_IMAGES:
        warnings.warn(fid_warning_text(len(images), len(references)), FIDSampleSizeWarning, stacklevel=2)
    return value


def load_images(source: str | Path | Sequence[str | Path]) -> list[Image.Image]:
    """RGB images of a folder (recursively, kohya `<n>_name/` subfolders included, sorted) or of a list of paths."""
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise EvaluationError(f"reference image folder {folder} does not exist")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise EvaluationError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    else:
        paths = [Path(p) for p in source]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


# ------------------------------------------------------------------------------------ the protocol


@dataclass
class Variant:
    """One column of the evaluation: the base model, or one LoRA at one weight."""

    label: str
    slug: str
    lora: str | None = None
    weight: float = 0.0
    adapter: str | None = None


def _variants(loras: Sequence[str], weights: Sequence[float]) -> list[Variant]:
    out = [Variant("base", "base")]
    stems: dict[str, int] = {}
    for path in loras:
        stem = Path(path).stem
        stems[stem] = stems.get(stem, 0) + 1
        name = stem if stems[stem] == 1 else f"{stem}_{stems[stem]}"
        for w in weights:
            if float(w) == 0.0:
                continue   # weight 0 is the base model
            slug = re.sub(r"[^\w.-]+", "_", f"{name}_w{float(w):g}")
            out.append(Variant(f"{name} @ {float(w):g}", slug, str(path), float(w)))
    return out


def _seed_runs(seeds: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Consecutive seeds as (start, count) runs of at most `batch` (generate uses seed + i for image i)."""
    runs: list[tuple[int, int]] = []
    for s in seeds:
        if runs and runs[-1][0] + runs[-1][1] == s and runs[-1][1] < batch:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


@dataclass
class ProtocolResult:
    """What run_protocol wrote: the table rows and the paths of every output (all under out_dir)."""

    out_dir: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    csv_path: Path
    markdown_path: Path
    report_path: Path
    html_path: Path
    json_path: Path
    manifest_path: Path
    plot_paths: list[Path] = field(default_factory=list)
    grid_paths: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def row(self, variant: str, group: str) -> dict[str, Any]:
        """The table row of `variant` ("base", "name @ 1") and `group` ("natural", "prior", ...)."""
        for r in self.rows:
            if r["variant"] == variant and r["group"] == group:
                return r
        raise KeyError(f"no row for {variant!r} / {group!r}")


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _source_of(m: Any) -> str | None:
    """The id or folder a metric model came from (for the report)."""
    if m is None or isinstance(m, str):
        return m
    return str(getattr(m, "source", type(m).__name__))


def run_protocol(model: str | BaseModel, loras: Sequence[str] = (), weights: Sequence[float] = (1.0,), *,
                 natural_prompts: Sequence[str], context_prompts: Sequence[str] = (),
                 prior_prompts: Sequence[str] = (), trigger: str = "",
                 reference_images: str | Path | Sequence[str | Path] | None = None,
                 seeds: int | Sequence[int] = 4, steps: int = 25, sampler: str = "DDIM", cfg_scale: float = 7.0,
                 negative_prompt: str = "", clip_skip: int = 1, out_dir: str | Path = "outputs/eval",
                 clip_model: str | ClipModel | None = DEFAULT_CLIP, dino_model: str | DinoModel | None = DEFAULT_DINO,
                 fid_kid: bool = True,
                 inception_weights: str | None = None, feature_extractor: Callable | None = None,
                 kid_subset_size: int | None = None, kid_subsets: int = 100,
                 extra_scorer: Callable[[list[Image.Image], list[str], str], dict[str, float | None]] | None = None,
                 device: str = "auto", dtype: str = "auto", model_config: str | None = None, batch_size: int = 8,
                 grid_prompts: int = 4, grid_seeds: int = 4, thumb: int = 128, progress: bool = True
                 ) -> ProtocolResult:
    """Sample the evaluation protocol for the base model and each LoRA at each weight, score it and write
    the report (see the module docstring). `model`: Hub id, folder, single file, or a loaded BaseModel.

    Groups: natural (concept prompts, with the trigger), new_context (concept in new contexts), prior (no
    concept), no_trigger (the natural prompts with the trigger removed; same seeds). `reference_images`
    (training images: folder or list of paths) are needed for CLIP-I, DINO, KID and FID. Metric models: a
    Hub id or folder, a loaded ClipModel/DinoModel, or None to skip. extra_scorer(images, prompts, group)
    returns extra columns (the toy judge: toy_judge_scorer()).
    """
    from tqdm.auto import tqdm

    from ..formats.png_info import save_png
    from ..generate.inference import generate, load_loras

    natural, context, prior = list(natural_prompts), list(context_prompts), list(prior_prompts)
    if not natural:
        raise EvaluationError("natural_prompts is empty: give at least one prompt of the concept in its usual setting")
    if trigger:
        missing = [p for p in natural + context if not has_trigger(p, trigger)]
        if missing:
            raise EvaluationError(f"the trigger {trigger!r} is missing from concept prompt(s) {missing[:3]}: "
                                  "natural and new-context prompts must contain it")
        leaked = [p for p in prior if has_trigger(p, trigger)]
        if leaked:
            raise EvaluationError(f"prior prompts must not contain the trigger {trigger!r}: {leaked[:3]}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise EvaluationError("seeds is empty")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if int(value) < 1:
            raise EvaluationError(f"{name} must be at least 1, got {value}")
    lora_list = [str(p) for p in loras]
    for p in lora_list:
        if not Path(p).is_file():
            raise FileNotFoundError(f"LoRA file {p} does not exist")
    weight_list = [float(w) for w in weights] or [1.0]
    groups = {"natural": natural}
    if context:
        groups["new_context"] = context
    if prior:
        groups["prior"] = prior
    if trigger:
        groups["no_trigger"] = [remove_trigger(p, trigger) for p in natural]
    dev = _resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # metric models first (on the CPU): a missing or offline model fails before minutes of sampling
    refs = load_images(reference_images) if reference_images is not None else None
    clip = clip_model if clip_model is None or isinstance(clip_model, ClipModel) else load_clip(str(clip_model))
    dino = dino_model if dino_model is None or isinstance(dino_model, DinoModel) else load_dino(str(dino_model))
    extractor = None
    if fid_kid and refs is not None:
        extractor = feature_extractor if feature_extractor is not None else load_inception(inception_weights)

    # ---- sampling
    from ..sd.models import detect_family, load_base

    own_model = not isinstance(model, BaseModel)
    base = load_base(str(model), device=dev, dtype=dtype, config=model_config) if own_model else model
    pipe = base.pipe
    pipe.set_progress_bar_config(disable=True)
    family = base.family if hasattr(base, "family") else detect_family(pipe)
    variants = _variants(lora_list, weight_list)
    adapters: list[str] = []
    if lora_list:
        adapters = load_loras(pipe, [(p, 1.0) for p in lora_list])
        by_path = dict(zip(lora_list, adapters))
        for v in variants:
            v.adapter = by_path.get(v.lora) if v.lora else None
    model_name = Path(str(getattr(base, "source", model))).name
    manifest: list[dict[str, Any]] = []
    total = len(variants) * sum(len(p) for p in groups.values()) * len(seed_list)
    bar = tqdm(total=total, desc="sampling", disable=not progress)
    try:
        for v in variants:
            if adapters:   # base = every adapter at weight 0 (exactly the base model)
                pipe.set_adapters(adapters, adapter_weights=[v.weight if a == v.adapter else 0.0 for a in adapters])
            for g, prompts in groups.items():
                for pi, prompt in enumerate(prompts):
                    for start, count in _seed_runs(seed_list, batch_size):
                        images, params = generate(
                            pipe, prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
                            seed=start, sampler=sampler, num_images=count, clip_skip=clip_skip, family=family,
                            model_name=model_name, loras=[(Path(v.lora).stem, v.weight)] if v.lora else None)
                        for k, (im, text) in enumerate(zip(images, params)):
                            rel = Path("images") / v.slug / g / f"p{pi:02d}_s{start + k}.png"
                            save_png(im, out / rel, text)
                            manifest.append({"variant": v.label, "lora": v.lora, "weight": v.weight, "group": g,
                                             "prompt_index": pi, "prompt": prompt, "seed": start + k,
                                             "path": rel.as_posix()})
                        bar.update(count)
    finally:
        bar.close()
        if adapters:
            pipe.delete_adapters(adapters)
    manifest_path = write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    if own_model:
        del pipe, base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- scoring
    for m in (clip, dino):
        if m is not None:
            m.to(dev)
    if extractor is not None and isinstance(extractor, torch.nn.Module):
        extractor.to(dev)
    rows, notes = _score(out, manifest, variants, groups, trigger, refs, clip, dino, extractor, extra_scorer,
                         kid_subset_size, kid_subsets, progress)
    for m in (clip, dino):
        if m is not None:
            m.to("cpu")

    settings = {"model": str(getattr(model, "source", model)), "loras": lora_list, "weights": weight_list,
                "seeds": seed_list, "steps": steps, "sampler": sampler, "cfg_scale": cfg_scale,
                "negative_prompt": negative_prompt, "clip_skip": clip_skip, "trigger": trigger,
                "prompts": groups, "reference_images": None if reference_images is None else
                (str(reference_images) if isinstance(reference_images, (str, Path)) else len(reference_images)),
                "n_reference_images": len(refs) if refs is not None else 0,
                "clip_model": _source_of(clip), "dino_model": _source_of(dino),
                "fid_kid_features": None if extractor is None else
                ("InceptionV3 (torch-fidelity weights, torchmetrics)" if feature_extractor is None
                 else type(extractor).__name__),
                "kid_subset_size": kid_subset_size, "kid_subsets": kid_subsets, "device": dev, "dtype": str(dtype),
                "extra_scorer": getattr(extra_scorer, "__name__", None) if extra_scorer else None}
    return write_outputs(out, rows, settings, manifest, variants, groups, notes, manifest_path,
                         grid_prompts=grid_prompts, grid_seeds=grid_seeds, thumb=thumb)


def _score(out: Path, manifest: list[dict], variants: list[Variant], groups: dict[str, list[str]], trigger: str,
           refs, clip, dino, extractor, extra_scorer, kid_subset_size, kid_subsets, progress: bool
           ) -> tuple[list[dict[str, Any]], list[str]]:
    """One table row per (variant, group), computed from the saved PNGs."""
    from tqdm.auto import tqdm

    notes: list[str] = []
    ref_clip = clip.image_embeds(refs) if clip is not None and refs else None
    ref_dino = dino.image_embeds(refs) if dino is not None and refs else None
    ref_feat = None
    size = None
    if extractor is not None and refs:
        with Image.open(out / manifest[0]["path"]) as first:
            size = first.size
        ref_feat = image_features(extractor, refs, size=size)
    base_emb: dict[tuple, dict[str, torch.Tensor]] = {}
    rows = []
    fid_warned = False
    for v in tqdm(variants, desc="scoring", disable=not progress):
        for g in groups:
            entries = sorted((e for e in manifest if e["variant"] == v.label and e["group"] == g),
                             key=lambda e: (e["prompt_index"], e["seed"]))
            images = []
            for e in entries:
                with Image.open(out / e["path"]) as im:
                    images.append(im.convert("RGB"))
            used = [e["prompt"] for e in entries]
            row: dict[str, Any] = {"variant": v.label, "lora": Path(v.lora).stem if v.lora else "",
                                   "weight": v.weight, "group": g, "n": len(images)}
            keys = [(g, e["prompt_index"], e["seed"]) for e in entries]
            if clip is not None:
                emb = clip.image_embeds(images)
                per = paired_cosine(emb, clip.text_embeds([remove_trigger(p, trigger) for p in used]))
                mean = float(per.mean())
                row["clip_t"], row["clip_t_100"] = mean, max(100.0 * mean, 0.0)
                if ref_clip is not None:
                    row["clip_i"] = mean_pairwise_cosine(emb, ref_clip)
                _vs_base(row, "base_clip_i", v, keys, emb, base_emb, "clip")
            if dino is not None:
                emb = dino.image_embeds(images)
                if ref_dino is not None:
                    row["dino"] = mean_pairwise_cosine(emb, ref_dino)
                _vs_base(row, "base_dino", v, keys, emb, base_emb, "dino")
            if ref_feat is not None:
                feats = image_features(extractor, images, size=size)
                if min(len(feats), len(ref_feat)) >= 2:
                    k = kid_from_features(feats, ref_feat, subset_size=kid_subset_size, subsets=kid_subsets)
                    row.update(kid_mean=k.mean, kid_std=k.std, kid_subset=k.subset_size)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", FIDSampleSizeWarning)
                        row["fid"] = fid_from_features(feats, ref_feat)
                    if min(len(feats), len(ref_feat)) < FID_MIN_IMAGES and not fid_warned:
                        fid_warned = True
                        notes.append(fid_warning_text(len(feats), len(ref_feat)))
                        warnings.warn(notes[-1], FIDSampleSizeWarning, stacklevel=3)
                elif "KID/FID need at least 2 images per set" not in " ".join(notes):
                    notes.append("KID/FID need at least 2 images per set: left empty")
            if extra_scorer is not None:
                for key, value in (extra_scorer(images, used, g) or {}).items():
                    row[str(key)] = None if value is None else float(value)
            rows.append(row)
    if refs is None:
        notes.append("no reference_images: CLIP-I, DINO, KID and FID are empty")
    return rows, notes


def _vs_base(row: dict, column: str, v: Variant, keys: list[tuple], emb: torch.Tensor,
             base_emb: dict[tuple, dict[str, torch.Tensor]], kind: str) -> None:
    """Mean cosine between each image and the base model's image for the same prompt and seed."""
    if v.lora is None:
        for key, e in zip(keys, emb):
            base_emb.setdefault(key, {})[kind] = e
        return
    pairs = [(e, base_emb[key][kind]) for key, e in zip(keys, emb) if kind in base_emb.get(key, {})]
    if pairs:
        row[column] = float(paired_cosine(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])).mean())


# ------------------------------------------------------------------------------------ outputs

def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The standard columns, then extra-scorer columns in order of first appearance."""
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in BASE_COLUMNS and k not in extra]
    return BASE_COLUMNS + extra


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _csv_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _md_cell(v: Any, column: str) -> str:
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if column == "weight":
            return f"{v:g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v).replace("|", "\\|")


def table_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def table_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table; a column empty in every row (a metric that was turned off) is left out
    (metrics.csv keeps every column)."""
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)] or list(columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _metric_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    extra = [c for c in columns if c not in BASE_COLUMNS]
    return [c for c in PLOT_METRICS + extra if any(_is_number(r.get(c)) for r in rows)]


def _save_figure(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def plot_variants(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | Path) -> Path | None:
    """Bars: each metric per variant (base, each LoRA/checkpoint at each weight), one bar per group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _metric_columns(rows, columns)
    if not metrics:
        return None
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    ncol = min(2, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig = Figure(figsize=(max(5.5, 1.1 * len(variants) * ncol + 2), 3.2 * nrow))
    FigureCanvasAgg(fig)
    width = 0.8 / len(groups)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for j, g in enumerate(groups):
            xs, ys, err = [], [], []
            for k, v in enumerate(variants):
                r = next((r for r in rows if r["variant"] == v and r["group"] == g), {})
                if _is_number(r.get(metric)):
                    xs.append(k - 0.4 + width * (j + 0.5))
                    ys.append(r[metric])
                    err.append(r.get("kid_std", 0.0) if metric == "kid_mean" and _is_number(r.get("kid_std")) else 0.0)
            if xs:
                ax.bar(xs, ys, width, yerr=err if any(err) else None, label=g)
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def plot_weights(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | Path) -> Path | None:
    """Lines: each metric against LoRA weight (0 = the base model), one line per LoRA and group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _metric_columns(rows, columns)
    loras = list(dict.fromkeys(r["lora"] for r in rows if r["lora"]))
    if not metrics or not loras:
        return None
    groups = list(dict.fromkeys(r["group"] for r in rows))
    ncol = min(2, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig = Figure(figsize=(6 * ncol, 3.2 * nrow))
    FigureCanvasAgg(fig)
    styles = ["-", "--", ":", "-."]
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        for li, lora in enumerate(loras):
            for gi, g in enumerate(groups):
                if metric.startswith("base_"):   # the base model compared with itself
                    pts = [(0.0, 1.0)] if any(not r["lora"] and r["group"] == g for r in rows) else []
                else:
                    pts = [(0.0, r[metric]) for r in rows
                           if not r["lora"] and r["group"] == g and _is_number(r.get(metric))]
                pts += sorted((r["weight"], r[metric]) for r in rows
                              if r["lora"] == lora and r["group"] == g and _is_number(r.get(metric)))
                if len(pts) >= 1:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=styles[li % len(styles)],
                            marker="o", color=f"C{gi}", label=f"{lora} / {g}" if len(loras) > 1 else g)
        ax.set_xlabel("LoRA weight (0 = base)", fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, Path(path))


def _thumb(im: Image.Image, size: int) -> Image.Image:
    scale = size / max(im.size)
    new = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    return im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _write_grid(out: Path, name: str, manifest: list[dict], columns: list[tuple[str, str, str]],
                row_prompts: list[tuple[int, str]], seeds: list[int], thumb: int) -> Path | None:
    """A labelled grid: rows = prompts, columns = (label, variant, group), cells = a strip of seeds."""
    from ..drawing import labelled_grid

    index = {(e["variant"], e["group"], e["prompt_index"], e["seed"]): e["path"] for e in manifest}
    cells = []
    for pi, _ in row_prompts:
        row = []
        for _, variant, group in columns:
            strip = []
            for s in seeds:
                path = index.get((variant, group, pi, s))
                if path is None:
                    return None
                with Image.open(out / path) as im:
                    strip.append(_thumb(im.convert("RGB"), thumb))
            row.append(strip)
        cells.append(row)
    if not cells:
        return None
    grid = labelled_grid(cells, [c[0] for c in columns], [_short(p) for _, p in row_prompts], zoom=1)
    path = out / "grids" / f"{name}.png"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def write_outputs(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any], manifest: list[dict],
                  variants: list[Variant], groups: dict[str, list[str]], notes: list[str], manifest_path: Path, *,
                  grid_prompts: int = 4, grid_seeds: int = 4, thumb: int = 128) -> ProtocolResult:
    """Table (CSV, Markdown, JSON), plots, grids and the report (Markdown and HTML, relative links)."""
    columns = table_columns(rows)
    csv_path = write_text(out / "metrics.csv", table_csv(rows, columns))
    md_path = write_text(out / "metrics.md", table_markdown(rows, columns))
    plots = [p for p in (plot_variants(rows, columns, out / "plots" / "variants.png"),
                         plot_weights(rows, columns, out / "plots" / "weights.png")) if p is not None]
    seeds = sorted({e["seed"] for e in manifest})[:grid_seeds]
    grids: list[Path] = []
    for g, prompts in groups.items():
        cols = [(v.label, v.label, g) for v in variants]
        p = _write_grid(out, g, manifest, cols, list(enumerate(prompts))[:grid_prompts], seeds, thumb)
        if p is not None:
            grids.append(p)
    if "no_trigger" in groups:
        cols = [c for v in variants for c in ((f"{v.label} +trigger", v.label, "natural"),
                                              (f"{v.label} -trigger", v.label, "no_trigger"))]
        p = _write_grid(out, "trigger", manifest, cols, list(enumerate(groups["natural"]))[:grid_prompts], seeds, thumb)
        if p is not None:
            grids.append(p)
    json_path = write_text(out / "results.json", json.dumps(
        {"settings": settings, "columns": columns, "rows": rows, "notes": notes}, indent=1, default=str) + "\n")
    def rel(p: Path) -> str:
        return p.relative_to(out).as_posix()

    trigger_table = _trigger_summary(rows, columns)
    report = _report_markdown(settings, rows, columns, trigger_table, notes, [rel(p) for p in plots],
                              [rel(p) for p in grids], groups)
    report_path = write_text(out / "report.md", report)
    html_path = write_text(out / "report.html", _report_html(settings, rows, columns, trigger_table, notes,
                                                             [rel(p) for p in plots], [rel(p) for p in grids], groups))
    return ProtocolResult(out, columns, rows, csv_path, md_path, report_path, html_path, json_path, manifest_path,
                          plots, grids, notes)


def _trigger_summary(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per variant and metric: the natural prompts with the trigger, without it, and the difference."""
    out = []
    metrics = [c for c in ("clip_i", "dino") + tuple(c for c in columns if c not in BASE_COLUMNS)]
    for r in rows:
        if r["group"] != "natural":
            continue
        other = next((o for o in rows if o["variant"] == r["variant"] and o["group"] == "no_trigger"), None)
        if other is None:
            continue
        for m in metrics:
            if _is_number(r.get(m)) and _is_number(other.get(m)):
                out.append({"variant": r["variant"], "metric": m, "with_trigger": r[m], "without_trigger": other[m],
                            "difference": r[m] - other[m]})
    return out


METRIC_NOTES = [
    ("clip_t", "mean cosine between each image and its prompt in CLIP space, the trigger word removed (CLIP does "
               "not know it); raw cosine, -1..1"),
    ("clip_t_100", "the same on torchmetrics' CLIPScore scale: 100 x max(mean cosine, 0)"),
    ("clip_i", "mean cosine over all (generated, training image) pairs of CLIP image embeddings"),
    ("dino", "the same with DINO ViT CLS embeddings (sensitive to the subject's identity, less to the prompt)"),
    ("base_clip_i / base_dino", "mean cosine between each image and the base model's image for the same prompt "
                                "and seed: near 1 on prior prompts means the prior is kept"),
    ("kid_mean / kid_std", "KID to the training images (InceptionV3 features, polynomial kernel), mean and "
                           "std over random subsets of kid_subset images; lower is closer"),
    ("fid", "FID to the training images; strongly biased below 2,048 images: compare only at equal counts"),
]


def _report_markdown(settings, rows, columns, trigger_table, notes, plots, grids, groups) -> str:
    s = settings
    lines = ["# Evaluation report", "",
             f"- model: `{s['model']}`", f"- LoRAs: {', '.join(f'`{p}`' for p in s['loras']) or 'none'}",
             f"- LoRA weights: {', '.join(f'{w:g}' for w in s['weights'])}",
             f"- sampler {s['sampler']}, {s['steps']} steps, CFG {s['cfg_scale']:g}, seeds {s['seeds']}"
             + (f", clip skip {s['clip_skip']}" if s['clip_skip'] > 1 else ""),
             f"- trigger: `{s['trigger']}`" if s["trigger"] else "- trigger: none (no trigger-word test)",
             f"- reference (training) images: {s['n_reference_images']}",
             f"- CLIP: `{s['clip_model'] or 'off'}`, DINO: `{s['dino_model'] or 'off'}`, "
             f"FID/KID features: {s['fid_kid_features'] or 'off'}",
             "", "## Prompt groups", ""]
    for g, prompts in groups.items():
        lines.append(f"- **{g}** ({GROUP_TITLES[g]}): " + "; ".join(f"`{p}`" for p in prompts))
    lines += ["", "## Metrics", "", table_markdown(rows, columns), "Columns:", ""]
    lines += [f"- `{name}`: {text}" for name, text in METRIC_NOTES]
    if any(c not in BASE_COLUMNS for c in columns):
        lines.append(f"- {', '.join(f'`{c}`' for c in columns if c not in BASE_COLUMNS)}: from the extra scorer "
                     f"({s['extra_scorer']})")
    if trigger_table:
        lines += ["", "## Trigger-word test", "",
                  "Natural prompts with and without the trigger, same seeds. A concept that shows up without its "
                  "trigger has leaked into the class word.", "",
                  table_markdown(trigger_table, ["variant", "metric", "with_trigger", "without_trigger", "difference"])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    if grids:
        lines += ["", "## Grids", "", "Rows: prompts; columns: base model and LoRAs; each cell: the first seeds.", ""]
        lines += [f"### {Path(p).stem}\n\n![{p}]({p})\n" for p in grids]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Files: [metrics.csv](metrics.csv), [metrics.md](metrics.md), [results.json](results.json), "
                  "[manifest.json](manifest.json) (every image with its prompt and seed; PNGs carry A1111 "
                  "parameters)."]
    return "\n".join(lines) + "\n"


def _html_table(rows, columns) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_md_cell(r.get(c), c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _report_html(settings, rows, columns, trigger_table, notes, plots, grids, groups) -> str:
    e = html.escape
    s = settings
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>",
             "<h1>Evaluation report</h1><ul>",
             f"<li>model: <code>{e(s['model'])}</code></li>",
             f"<li>LoRAs: {e(', '.join(s['loras']) or 'none')}; weights {e(', '.join(f'{w:g}' for w in s['weights']))}</li>",
             f"<li>sampler {e(s['sampler'])}, {s['steps']} steps, CFG {s['cfg_scale']:g}, seeds {e(str(s['seeds']))}</li>",
             f"<li>trigger: <code>{e(s['trigger'] or 'none')}</code>; reference images: {s['n_reference_images']}</li>",
             f"<li>CLIP: <code>{e(s['clip_model'] or 'off')}</code>, DINO: <code>{e(s['dino_model'] or 'off')}</code>, "
             f"FID/KID features: {e(s['fid_kid_features'] or 'off')}</li></ul><h2>Prompt groups</h2><ul>"]
    parts += [f"<li><b>{e(g)}</b> ({e(GROUP_TITLES[g])}): {e('; '.join(p))}</li>" for g, p in groups.items()]
    parts += ["</ul><h2>Metrics</h2>", _html_table(rows, columns), "<ul>"]
    parts += [f"<li><code>{e(n)}</code>: {e(t)}</li>" for n, t in METRIC_NOTES]
    parts.append("</ul>")
    if trigger_table:
        parts += ["<h2>Trigger-word test</h2>",
                  _html_table(trigger_table, ["variant", "metric", "with_trigger", "without_trigger", "difference"])]
    if plots:
        parts += ["<h2>Plots</h2>"] + [f"<p><img src='{e(p)}' alt='{e(p)}'></p>" for p in plots]
    if grids:
        parts += ["<h2>Grids</h2>"] + [f"<h3>{e(Path(p).stem)}</h3><p><img src='{e(p)}' alt='{e(p)}'></p>" for p in grids]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in notes] + ["</ul>"]
    parts.append("<p>Files: <a href='metrics.csv'>metrics.csv</a>, <a href='metrics.md'>metrics.md</a>, "
                 "<a href='results.json'>results.json</a>, <a href='manifest.json'>manifest.json</a></p></body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ the toy world


def run_eval_config(cfg, *, seeds: int | Sequence[int] | None = None, **overrides: Any) -> ProtocolResult:
    """run_protocol with the settings of an EvalConfig (05_eval's form, `evaluate --config`). `seeds`
    (a count or explicit seeds) replaces cfg.num_seeds; other keywords go to run_protocol, replacing the
    config's value where they name the same argument (e.g. a loaded metric model for clip_model)."""
    args = dict(natural_prompts=cfg.prompts, context_prompts=cfg.context_prompts, prior_prompts=cfg.prior_prompts,
                trigger=cfg.trigger, reference_images=cfg.reference_dir, seeds=seeds or cfg.num_seeds,
                steps=cfg.steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale, negative_prompt=cfg.negative_prompt,
                clip_skip=cfg.clip_skip, out_dir=cfg.out_dir, clip_model=cfg.clip_model, dino_model=cfg.dino_model,
                fid_kid=cfg.fid_kid, inception_weights=cfg.inception_weights, model_config=cfg.model_config,
                batch_size=cfg.batch_size)
    args.update(overrides)
    return run_protocol(cfg.model, cfg.loras, cfg.weights, **args)


