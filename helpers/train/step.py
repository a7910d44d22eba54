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
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    text_grad: bool = False          # gradients flow through the text encoders (trained, or new token vectors)
    expand: Callable[[str], str] = str   # a caption with each new token written out as all its vectors' tokens
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None  # pixels -> latents when not cached
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def condition(self, batch: dict) -> dict[str, Any]:
        """UNet keyword arguments for a batch: text embeddings and, for SDXL, pooled + time ids."""
        with torch.set_grad_enabled(self.text_grad):
            emb = encode_prompts(self.family, self.tokenizers, self.text_encoders,
                                 [self.expand(c) for c in batch["captions"]], clip_skip=self.clip_skip,
                                 device=self.device)
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb.hidden}
        if self.family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
            kwargs["added_cond_kwargs"] = {"text_embeds": emb.pooled, "time_ids": to_device(time_ids, self.device)}
        return kwargs

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
        latents = self.latents(batch)
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen, device=self.device)
            if self.noise_offset:
                noise = noise + self.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen,
                                                                device=self.device)
        if timesteps is None:
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=gen,
                                      device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = unet(noisy.to(self.weight_dtype), timesteps, **self.condition(batch)).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        is_class = (to_device(batch["is_class"], self.device) if "is_class" in batch
                    else torch.zeros(b, dtype=torch.bool, device=self.device))
        weights = loss_weights(timesteps, self.alphas_cumprod, is_class, prediction_type=self.prediction_type,
                               min_snr_gamma=self.min_snr_gamma, prior_loss_weight=self.prior_loss_weight)
        return (per_sample * weights).mean()


def loss_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, is_class: torch.Tensor, *,
                 prediction_type: str = "epsilon", min_snr_gamma: float | None = None,
                 prior_loss_weight: float = 1.0) -> torch.Tensor:
    """Per-sample loss weights: min-SNR-gamma (Hang et al. 2023; for v-prediction min(snr, g) / (snr + 1))
    times `prior_loss_weight` on class (regularization) images."""
    weights = torch.ones(timesteps.shape, device=timesteps.device)
    if min_snr_gamma:
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
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
