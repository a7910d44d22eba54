"""The metrics, on features and on images: CLIP-T, CLIP-I, DINO, KID and FID, the metric models they need
(CLIP, DINO, InceptionV3; loaded offline-aware with a message that says how to get them)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..atomic import atomic_path
from ..data.decode import IMAGE_EXTENSIONS
from ..sd.models import ModelLoadError, url_reachable

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


DEFAULT_DINO = "facebook/dino-vits16"


# torch-fidelity's InceptionV3 (the TF FID network's weights), which torchmetrics' FID/KID use
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


FID_MIN_IMAGES = 2048




class MetricModelError(ModelLoadError):
    """A metric model (CLIP, DINO, InceptionV3) cannot be loaded; the message says how to get it."""


class FIDSampleSizeWarning(UserWarning):
    """FID from fewer than 2,048 images per set: biased, compare only at equal sizes (or use KID)."""


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


def _hub_offline(source: str, local_files_only: bool | None) -> bool:
    """Whether loading `source` must stay in the local cache (False for folders: no Hub involved)."""
    from ..sd.models import use_local_files_only

    return False if Path(source).expanduser().exists() else use_local_files_only(local_files_only)


def _from_pretrained(cls, source: str, what: str, offline: bool, **kwargs):
    """`cls.from_pretrained` for a local folder or a Hub id, with errors a user can act on."""
    from ..sd.models import offline_by_env

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
            why = "HF_HUB_OFFLINE=1" if offline_by_env() else "no network"
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
    from ..sd.models import offline_by_env

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
    elif not path.is_file() and (offline_by_env() or not url_reachable(INCEPTION_URL)):
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
            raise EvaluationError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    else:
        paths = [Path(p) for p in source]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


class EvaluationError(ValueError):
    """Evaluation inputs that cannot work (no prompts, a missing trigger, too few images); says what to change."""
