"""One training step: the diffusion loss of a batch (noise, timesteps, target, weights) and the update it makes.

`DiffusionStep.loss` draws noise (with the optional offset) and timesteps, noises the latents, predicts
with the UNet under the batch's text conditioning and returns the weighted MSE to the noise (or to v).
`OptimizerStep` turns a loss into an update: backward, gradient sync where DDP cannot see the parameters,
clipping, optimizer and LR-schedule step. The trainer and the step benchmark both use these two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..sd.text_encoding import encode_prompts, sdxl_time_ids
from ..sd.transfer import to_device


@dataclass(frozen=True)
class Variants:
    """sd-scripts' noise, timestep and loss variants, by its names; the defaults are plain DDPM training
    (and draw exactly the same random numbers as no variants at all)."""

    noise_offset_random_strength: bool = False
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False

    @classmethod
    def from_config(cls, cfg) -> "Variants":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator | None, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise: `noise` plus upsampled coarser noise at shrinking scales (each 2-4x smaller,
    weighted discount**i), rescaled to unit std (sd-scripts' pyramid_noise_like, with our generator)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen, device=noise.device)) * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, c, hn, wn), generator=gen, device=noise.device)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def huber_threshold(v: Variants, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, num_timesteps: int
                    ) -> torch.Tensor:
    """Per-sample huber_c for the schedule: constant, exponential in t, or from the noise level (snr)."""
    if v.huber_schedule == "exponential":
        alpha = -torch.log(torch.tensor(v.huber_c)) / num_timesteps
        return torch.exp(-alpha * timesteps.float()) * v.huber_scale
    if v.huber_schedule == "snr":
        sigmas = ((1 - alphas_cumprod[timesteps]) / alphas_cumprod[timesteps]) ** 0.5
        return (1 - v.huber_c) / (1 + sigmas) ** 2 + v.huber_c
    return torch.full(timesteps.shape, v.huber_c * v.huber_scale, device=timesteps.device)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                    huber_c: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample (mean over its elements): l2, l1, huber or smooth_l1 (sd-scripts' forms); with
    `mask` (B, 1, H, W) in pixels, each latent element weighted by the mask's mean over its pixels (area
    downsampling), as sd-scripts' masked loss."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        elem = diff ** 2
    elif loss_type == "l1":
        elem = diff.abs()
    elif loss_type in ("huber", "smooth_l1"):
        c = huber_c.view(-1, *([1] * (diff.ndim - 1)))
        elem = torch.sqrt(diff ** 2 + c ** 2) - c
        elem = 2 * c * elem if loss_type == "huber" else 2 * elem
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if mask is not None:
        elem = elem * F.interpolate(mask.float(), size=diff.shape[-2:], mode="area")
    return elem.mean(dim=tuple(range(1, diff.ndim)))


@dataclass
class DiffusionStep:
    """The loss of one batch, as sd-scripts and diffusers' training examples compute it."""

    family: str                      # "sd1" | "sd2" | "sdxl": how the text is encoded and the UNet conditioned
    noise_scheduler: Any             # the base model's DDPM training schedule
    tokenizers: list
    text_encoders: list              # the prepared (possibly DDP-wrapped) encoders when they are trained
    device: torch.device
    weight_dtype: torch.dtype = torch.float32   # the UNet's compute dtype
    clip_skip: int = 1               # A1111's meaning: 1 = the last layer
    max_token_length: int = 75       # 150 / 225: captions encoded in 2 / 3 chunks of 75 tokens (sd-scripts)
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    text_grad: bool = False          # gradients flow through the text encoders (trained, or new token vectors)
    expand: Callable[[str], str] = str   # a caption with each new token written out as all its vectors' tokens
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None  # pixels -> latents when not cached
    variants: Variants = field(default_factory=Variants)
    text_cache: dict | None = None   # {caption: (hidden, pooled)} when cache_text_encoder_outputs (train/text_cache)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def condition(self, batch: dict) -> dict[str, Any]:
        """UNet keyword arguments for a batch: text embeddings and, for SDXL, pooled + time ids."""
        if self.text_cache is not None:
            emb = self.cached(batch["captions"])
        else:
            with torch.set_grad_enabled(self.text_grad):
                emb = encode_prompts(self.family, self.tokenizers, self.text_encoders,
                                     [self.expand(c) for c in batch["captions"]], clip_skip=self.clip_skip,
                                     max_token_length=self.max_token_length, device=self.device)
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb.hidden}
        if self.family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
            kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": to_device(time_ids, self.device)}
        return kwargs

    def cached(self, captions: list[str]):
        """The captions' cached encodings as one batch on the device."""
        from ..sd.text_encoding import PromptEmbeds

        try:
            rows = [self.text_cache[c] for c in captions]
        except KeyError as e:
            raise ValueError(f"caption {e.args[0]!r} is not in the text-encoder cache") from None
        hidden = torch.stack([h for h, _ in rows]).to(self.device, self.weight_dtype)
        pooled = (torch.stack([p for _, p in rows]).to(self.device, self.weight_dtype)
                  if rows[0][1] is not None else None)
        return PromptEmbeds(hidden, pooled)

    def latents(self, batch: dict) -> torch.Tensor:
        """The batch's latents in fp32: cached ones, or its pixels encoded now."""
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        if self.encode_images is None:
            raise ValueError("this batch has no cached latents and the step was built without an image encoder")
        with torch.no_grad():
            return self.encode_images(batch["pixel_values"]).to(self.device, torch.float32)

    def loss(self, unet, batch: dict, gen: torch.Generator | None, *, noise: torch.Tensor | None = None,
             timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss for one batch: MSE to the noise (or v), with min-SNR weighting and the
        prior-preservation weight on class images. `noise`/`timesteps` fix the draw (validation)."""
        v = self.variants
        latents = self.latents(batch)
        b = latents.shape[0]
        fixed = noise is not None   # validation: the draw is given, no random variant applies
        if noise is None:
            noise = self.draw_noise(latents, gen)
        if timesteps is None:
            top = v.max_timestep or self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(v.min_timestep, top, (b,), generator=gen, device=self.device)
        noised_with = noise
        if v.ip_noise_gamma and not fixed:   # input perturbation: noisier inputs, the same target
            strength = v.ip_noise_gamma * (torch.rand(1, generator=gen, device=self.device)
                                           if v.ip_noise_gamma_random_strength else 1.0)
            noised_with = noise + strength * torch.randn(latents.shape, generator=gen, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noised_with, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = unet(noisy.to(self.weight_dtype), timesteps, **self.condition(batch)).sample
        huber_c = (huber_threshold(v, timesteps, self.alphas_cumprod, self.noise_scheduler.config.num_train_timesteps)
                   if v.loss_type in ("huber", "smooth_l1") else None)
        mask = to_device(batch["mask"], self.device) if "mask" in batch else None
        per_sample = per_sample_loss(pred, target, v.loss_type, huber_c, mask)
        is_class = (to_device(batch["is_class"], self.device) if "is_class" in batch
                    else torch.zeros(b, dtype=torch.bool, device=self.device))
        weights = loss_weights(timesteps, self.alphas_cumprod, is_class, prediction_type=self.prediction_type,
                               min_snr_gamma=self.min_snr_gamma, prior_loss_weight=self.prior_loss_weight,
                               debiased=v.debiased_estimation_loss,
                               scale_v_like_noise=v.scale_v_pred_loss_like_noise_pred)
        return (per_sample * weights).mean()

    def draw_noise(self, latents: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """The training noise: gaussian, plus the per-channel offset and the pyramid when they are on."""
        v = self.variants
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        if self.noise_offset:
            offset = self.noise_offset * (torch.rand(1, generator=gen, device=self.device)
                                          if v.noise_offset_random_strength else 1.0)
            noise = noise + offset * torch.randn((b, c, 1, 1), generator=gen, device=self.device)
        if v.multires_noise_iterations:
            noise = pyramid_noise(noise, gen, v.multires_noise_iterations, v.multires_noise_discount)
        return noise


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, is_class: torch.Tensor, *,
                 prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
                 prior_loss_weight: float = 1.0, debiased: bool = False,
                 scale_v_like_noise: bool = False) -> torch.Tensor:
    """Per-sample loss weights: min-SNR-gamma (Hang et al. 2023; for v-prediction min(snr, g) / (snr + 1)),
    debiased estimation (1/sqrt(snr); v: 1/(snr + 1)), v-loss scaled like epsilon's (snr/(snr + 1)), times
    `prior_loss_weight` on class (regularization) images. The last two use snr capped at 1000, as sd-scripts."""
    weights = torch.ones(timesteps.shape, device=timesteps.device)
    v_pred = prediction_type == "v_prediction"
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    if min_snr_gamma:
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weights = clipped / (snr + 1) if v_pred else clipped / snr
    capped = torch.clamp(snr, max=1000.0)
    if scale_v_like_noise and v_pred:
        weights = weights * capped / (capped + 1)
    if debiased:
        weights = weights / (capped + 1) if v_pred else weights / torch.sqrt(capped)
    return weights * torch.where(is_class, prior_loss_weight, 1.0)


def vae_encoder(vae, device, gen: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function pixels in [-1, 1] -> scaled (and shifted) latents, as the UNet sees them (sampling with `gen`)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents = dist.sample(generator=gen).float()
        return (latents - shift) * scale

    return encode


@dataclass
class OptimizerStep:
    """A loss -> one update of the trainable parameters, inside `accelerator.accumulate(...)`."""

    accelerator: Any
    optimizer: Any
    lr_scheduler: Any
    params: list                      # every trainable parameter (clipped together)
    max_grad_norm: float = 0.0
    outside_ddp: list = field(default_factory=list)  # trained parameters no DDP wrapper syncs (new token vectors)

    def __call__(self, loss: torch.Tensor) -> None:
        acc = self.accelerator
        acc.backward(loss)
        if acc.sync_gradients and self.outside_ddp and acc.num_processes > 1:
            for p in self.outside_ddp:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, "mean")
        if acc.sync_gradients and self.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop this window's gradients without an update (a skipped bad step)."""
        self.optimizer.zero_grad(set_to_none=True)
