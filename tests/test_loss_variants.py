"""sd-scripts' noise, timestep and loss variants: each as its formula says, and off by default."""

import math

import pytest
import torch

from helpers.config import ConfigError, TrainConfig
from helpers.train.step import Variants, huber_threshold, loss_weights, per_sample_loss, pyramid_noise


def _alphas():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def test_losses_follow_their_formulas():
    pred, target = torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, -1.0]])   # one sample, errors 0 and 4
    c = torch.tensor([0.5])
    assert per_sample_loss(pred, target, "l2").item() == 8.0
    assert per_sample_loss(pred, target, "l1").item() == 2.0
    huber = 2 * 0.5 * (math.sqrt(16 + 0.25) - 0.5) / 2      # the zero error contributes 0
    assert per_sample_loss(pred, target, "huber", c).item() == pytest.approx(huber)
    assert per_sample_loss(pred, target, "smooth_l1", c).item() == pytest.approx(huber / 0.5)


def test_huber_schedules():
    a = _alphas()
    t = torch.tensor([0, 500, 999])
    const = huber_threshold(Variants(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=2.0),
                            t, a, 1000)
    assert const.tolist() == pytest.approx([0.4, 0.4, 0.4])
    exp = huber_threshold(Variants(huber_schedule="exponential", huber_c=0.1), t, a, 1000)
    assert exp[0].item() == pytest.approx(1.0) and exp[2].item() == pytest.approx(0.1 ** (999 / 1000))
    snr = huber_threshold(Variants(huber_schedule="snr", huber_c=0.1), t, a, 1000)
    sigma = ((1 - a[t]) / a[t]) ** 0.5
    assert snr.tolist() == pytest.approx(((1 - 0.1) / (1 + sigma) ** 2 + 0.1).tolist())
    assert snr[0] > snr[1] > snr[2] > 0.1     # clean inputs: close to l2; noisy ones: robust


def test_debiased_and_v_scaling_weights():
    a = _alphas()
    t = torch.tensor([10, 500, 990])
    none = torch.zeros(3, dtype=torch.bool)
    snr = torch.clamp(a[t] / (1 - a[t]), max=1000)
    deb = loss_weights(t, a, none, debiased=True)
    assert deb.tolist() == pytest.approx((1 / snr.sqrt()).tolist())
    deb_v = loss_weights(t, a, none, prediction_type="v_prediction", debiased=True)
    assert deb_v.tolist() == pytest.approx((1 / (snr + 1)).tolist())
    scaled = loss_weights(t, a, none, prediction_type="v_prediction", scale_v_like_noise=True)
    assert scaled.tolist() == pytest.approx((snr / (snr + 1)).tolist())
    assert loss_weights(t, a, none, scale_v_like_noise=True).tolist() == [1.0, 1.0, 1.0]   # epsilon: no-op


def test_pyramid_noise_has_unit_std_and_low_frequencies():
    g = torch.Generator().manual_seed(0)
    base = torch.randn((8, 4, 32, 32), generator=g)
    out = pyramid_noise(base, g, iterations=6, discount=0.8)
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    # coarse levels correlate neighbouring pixels: plain gaussian noise has none
    def neighbour_corr(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    assert abs(neighbour_corr(base)) < 0.05 and neighbour_corr(out) > 0.15


def test_the_step_draws_the_same_numbers_with_variants_off(tiny_sd15_dir):
    """Defaults: exactly plain training's draw (resume and seeds stay exact); timesteps honour the range."""
    from helpers.sd.models import load_base
    from helpers.train.step import DiffusionStep

    base = load_base(str(tiny_sd15_dir))
    step = DiffusionStep("sd1", base.noise_scheduler(), base.tokenizers, base.text_encoders, torch.device("cpu"),
                         variants=Variants(min_timestep=0))
    lat = torch.zeros(2, 4, 16, 16)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(step.draw_noise(lat, g1), torch.randn(lat.shape, generator=g2))
    ranged = DiffusionStep("sd1", base.noise_scheduler(), base.tokenizers, base.text_encoders, torch.device("cpu"),
                           variants=Variants(min_timestep=200, max_timestep=300))
    seen = []
    unet = lambda x, t, **kw: seen.append(t.clone()) or type("O", (), {"sample": torch.zeros_like(x)})  # noqa: E731
    for seed in range(20):
        ranged.loss(unet, {"latents": lat, "captions": ["a", "b"]}, torch.Generator().manual_seed(seed))
    t = torch.cat(seen)
    assert t.min() >= 200 and t.max() < 300


def test_settings_are_checked_with_messages():
    with pytest.raises(ConfigError, match="max_timestep \\(100\\) must be above min_timestep \\(200\\)"):
        TrainConfig(min_timestep=200, max_timestep=100)
    with pytest.raises(ConfigError, match="loss_type must be one of"):
        TrainConfig(loss_type="l3")
    with pytest.raises(ConfigError, match="zero_terminal_snr needs prediction_type v_prediction"):
        TrainConfig(zero_terminal_snr=True, prediction_type="epsilon")


def test_a_run_with_every_variant_trains_and_records_them(tiny_sd15_dir, concept_dir, tmp_path):
    from safetensors import safe_open

    from helpers.train.loop import train

    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(concept_dir), resolution=32,
                      max_train_steps=3, train_batch_size=2, output_dir=str(tmp_path), output_name="v",
                      mixed_precision="no", loss_type="huber", huber_schedule="snr", min_timestep=100,
                      max_timestep=900, multires_noise_iterations=4, ip_noise_gamma=0.1, noise_offset=0.05,
                      noise_offset_random_strength=True, debiased_estimation_loss=True)
    result = train(cfg, progress=False)
    assert math.isfinite(result.final_loss)
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_min_timestep"], meta["ss_max_timestep"],
            meta["ss_multires_noise_iterations"], meta["ss_debiased_estimation"]) == \
        ("huber", "snr", "100", "900", "4", "True")
    with pytest.raises(ConfigError, match="zero_terminal_snr needs a v-prediction model"):
        train(cfg.replace(zero_terminal_snr=True, output_name="z"), progress=False)


def _fixed_step(tiny_sd15_dir, **variants):
    from helpers.sd.models import load_base
    from helpers.train.step import DiffusionStep

    base = load_base(str(tiny_sd15_dir))
    return DiffusionStep("sd1", base.noise_scheduler(), base.tokenizers, base.text_encoders, torch.device("cpu"),
                         noise_offset=variants.pop("noise_offset", 0.0), variants=Variants(**variants))


class _Recorder:
    """A UNet stand-in: records its input, predicts zeros."""

    def __call__(self, x, t, **kw):
        self.x, self.t = x.clone(), t.clone()
        return type("O", (), {"sample": torch.zeros_like(x)})


def test_defaults_reproduce_the_plain_loss_bit_for_bit(tiny_sd15_dir):
    step = _fixed_step(tiny_sd15_dir)
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    unet = _Recorder()
    loss = step.loss(unet, {"latents": lat, "captions": ["a", "b"]}, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)           # the plain recipe, by hand: noise, t, add_noise, MSE
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    a = step.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(unet.t, t) and torch.allclose(unet.x, a.sqrt() * lat + (1 - a).sqrt() * noise)
    assert loss.item() == ((0 - noise) ** 2).mean(dim=(1, 2, 3)).mean().item()


def test_input_perturbation_and_random_offset_strengths_by_hand(tiny_sd15_dir):
    lat = torch.zeros(1, 4, 16, 16)
    unet = _Recorder()
    step = _fixed_step(tiny_sd15_dir, ip_noise_gamma=0.1)
    loss = step.loss(unet, {"latents": lat, "captions": ["a"]}, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(lat.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    extra = torch.randn(lat.shape, generator=g)
    a = step.noise_scheduler.alphas_cumprod[t]
    assert torch.allclose(unet.x, (1 - a).sqrt() * (noise + 0.1 * extra))       # the input is perturbed ...
    assert loss.item() == pytest.approx((noise ** 2).mean().item(), rel=1e-6)      # ... the target is not

    step = _fixed_step(tiny_sd15_dir, noise_offset=0.1, noise_offset_random_strength=True)
    got = step.draw_noise(lat, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    base = torch.randn(lat.shape, generator=g)
    strength = 0.1 * torch.rand(1, generator=g)
    assert torch.allclose(got, base + strength * torch.randn((1, 4, 1, 1), generator=g))
