"""Reliability of a training run: kill-and-resume gives the same LoRA, interrupted saves break nothing,
NaN and out-of-memory stop with advice, full disks keep the last good files, 2 processes resume."""

import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers.config import ConfigError, TrainConfig, save_config
from helpers.train.errors import TrainingError, nan_message
from helpers.train.log import read_log
from helpers.train.loop import train
from helpers.train.state import list_states

REPO = Path(__file__).parents[1]


def make_cfg(base_dir, data_dir, out_dir, **overrides) -> TrainConfig:
    # 12 images x 2 repeats / batch 4 = 6 steps per epoch; states every 2 steps: at 2, 4 (mid-epoch),
    # 6 (an epoch boundary), 8 and 10. Everything that draws random numbers is on: flip, caption shuffle and
    # dropout, noise offset, LoRA dropout (the global torch RNG), VAE sampling each step (no latent cache).
    settings = dict(pretrained_model=str(base_dir), train_data_dir=str(data_dir), resolution=32,
                    enable_bucket=False, rank=4, alpha=2.0, target="full", learning_rate=2e-3,
                    train_batch_size=4, max_train_steps=12, mixed_precision="no", output_dir=str(out_dir),
                    output_name="t", log_every_n_steps=1, save_precision="float", seed=5, flip_aug=True,
                    shuffle_caption=True, caption_dropout_rate=0.1, noise_offset=0.05, lora_dropout=0.1,
                    cache_latents=False, save_state_every_n_steps=2, save_state_last_n=2)
    settings.update(overrides)
    return TrainConfig(**settings)


def lora_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_lora(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_sd15_dir, concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(make_cfg(tiny_sd15_dir, concept_dir, out), progress=False)
    return result


# A training subprocess that dies with SIGKILL (no cleanup, no finally blocks) at a chosen moment.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from helpers.config import load_config
    from helpers.train.loop import train
    cfg = load_config(sys.argv[1])
    mode, at = sys.argv[2], int(sys.argv[3])
    if mode == "step":       # right after the step's log record, before its saves
        def on_event(kind, data):
            if kind == "log" and data.get("step") == at:
                os.kill(os.getpid(), signal.SIGKILL)
        train(cfg, on_event=on_event, progress=False)
    elif mode == "state":    # halfway through writing the state of step `at`
        import torch
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            if f"step{at:06d}" in str(f) and str(f).endswith("rng.pt"):
                with open(f, "wb") as fh:
                    fh.write(b"PK\\x03\\x04 half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = dying_save
        train(cfg, progress=False)
    elif mode == "lora":     # halfway through writing the final LoRA file
        import safetensors.torch as st
        real = st.save_file
        def dying(tensors, filename, metadata=None):
            if os.path.basename(str(filename)).startswith(cfg.output_name + ".safetensors"):
                real(tensors, filename, metadata=metadata)
                size = os.path.getsize(filename)
                with open(filename, "r+b") as fh:
                    fh.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(tensors, filename, metadata=metadata)
        st.save_file = dying
        train(cfg, progress=False)
""")


def run_killed(cfg: TrainConfig, mode: str, at: int, tmp_path: Path) -> subprocess.CompletedProcess:
    config = save_config(cfg, tmp_path / f"killed_{mode}.toml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(config), mode, str(at)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"expected death by SIGKILL, got {proc.returncode}\n{proc.stderr[-2000:]}"
    return proc


def test_kill_at_a_step_then_resume_equals_the_uninterrupted_run(uninterrupted, tiny_sd15_dir, concept_dir,
                                                                  tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_sd15_dir, concept_dir, out)
    run_killed(cfg, "step", 11, tmp_path)
    states = list_states(out, "t")
    assert [p.name for p in states] == ["t-step000008", "t-step000010"]  # the last 2 kept
    assert not (out / "t.safetensors").exists()
    resumed = train(cfg, progress=False, resume=True)  # state 10: mid-epoch (batch 4 of 6 of epoch 2)
    assert resumed.resumed_from == states[-1]
    assert_same_lora(resumed.lora_path, uninterrupted.lora_path)
    # the log is the uninterrupted run's: steps 1..12 once each, the same losses bit for bit
    got, want = read_log(resumed.log_path), read_log(uninterrupted.log_path)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


def test_kill_while_writing_a_state_resumes_from_the_previous_one(uninterrupted, tiny_sd15_dir, concept_dir,
                                                                   tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(tiny_sd15_dir, concept_dir, out)
    run_killed(cfg, "state", 8, tmp_path)
    leftovers = [p.name for p in (out / "states").iterdir()]
    assert any(name.startswith("t-step000008.") for name in leftovers)  # the half-written temp folder
    assert [p.name for p in list_states(out, "t")] == ["t-step000004", "t-step000006"]  # never picked
    resumed = train(cfg, progress=False, resume="latest")  # state 6: an epoch boundary
    assert resumed.resumed_from.name == "t-step000006"
    assert_same_lora(resumed.lora_path, uninterrupted.lora_path)


def test_kill_while_writing_the_lora_keeps_the_previous_file(tiny_sd15_dir, concept_dir, tmp_path):
    out = tmp_path / "run"
    first = train(make_cfg(tiny_sd15_dir, concept_dir, out, max_train_steps=3, save_state_every_n_steps=None),
                  progress=False)
    before = hashlib.sha256(first.lora_path.read_bytes()).hexdigest()
    run_killed(make_cfg(tiny_sd15_dir, concept_dir, out, max_train_steps=4, seed=6,
                        save_state_every_n_steps=None), "lora", 0, tmp_path)
    assert hashlib.sha256((out / "t.safetensors").read_bytes()).hexdigest() == before
    assert lora_tensors(out / "t.safetensors")  # still a complete, loadable file


def test_resume_with_other_settings_is_refused(uninterrupted, tiny_sd15_dir, concept_dir):
    out = uninterrupted.output_dir
    with pytest.raises(ConfigError, match=r"learning_rate: 0.002 in the state, 0.001 now"):
        train(make_cfg(tiny_sd15_dir, concept_dir, out, learning_rate=1e-3), progress=False, resume=True)
    with pytest.raises(ConfigError, match="is not a state folder"):
        train(make_cfg(tiny_sd15_dir, concept_dir, out), progress=False, resume=str(out / "nope"))


def test_resume_latest_without_a_state_starts_fresh(tiny_sd15_dir, concept_dir, tmp_path, capsys):
    result = train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path, max_train_steps=2, save_state_every_n_steps=None),
                   progress=False, resume=True)
    assert result.resumed_from is None and result.steps == 2
    assert "no saved state" in capsys.readouterr().out


# ---- NaN ------------------------------------------------------------------------------------------

def test_nan_loss_stops_the_run_with_advice_and_keeps_the_last_state(tiny_sd15_dir, concept_dir, tmp_path):
    from helpers.sd.models import load_base

    base = load_base(str(tiny_sd15_dir))

    def poison(kind, data):  # a LoRA weight blows up after step 5, as with a far too high learning rate
        if kind == "log" and data.get("step") == 5:
            lora_b = next(p for n, p in base.unet.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                lora_b.fill_(float("nan"))

    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, cache_latents=True)
    with pytest.raises(TrainingError) as err:
        train(cfg, base=base, on_event=poison, progress=False)
    text = str(err.value)
    assert "The loss became NaN or infinite at step 6" in text
    assert "learning rate too high (0.002)" in text
    assert f"The last good save is kept: {tmp_path / 'states' / 't-step000004'}" in text
    assert [p.name for p in list_states(tmp_path, "t")] == ["t-step000002", "t-step000004"]


def test_nan_policy_skip_skips_a_bad_step_and_stops_after_five(tiny_sd15_dir, concept_dir, tmp_path, monkeypatch):
    from helpers.train import step as train_mod

    real_loss = train_mod.DiffusionStep.loss
    calls = {"n": 0}
    bad_calls: set[int] = {3}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(train_mod.DiffusionStep, "loss", flaky)
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "a", cache_latents=True, max_train_steps=6,
                   nan_policy="skip", save_state_every_n_steps=None)
    result = train(cfg, progress=False)
    assert result.steps == 6 and result.skipped_steps == 1
    assert all(torch.isfinite(t).all() for t in lora_tensors(result.lora_path).values())

    calls["n"], bad_calls = 0, set(range(2, 100))  # from the 2nd step on, every loss is NaN
    with pytest.raises(TrainingError, match=r"\(5 bad steps in a row were skipped\)"):
        train(cfg.replace(output_dir=str(tmp_path / "b")), progress=False)


def test_nan_found_between_logs_names_its_step_and_saves_nothing_after_it(tiny_sd15_dir, concept_dir, tmp_path,
                                                                            monkeypatch):
    """nan_policy="stop" reads the loss back only when a log or save is due: a NaN at step 2 is found at the
    log of step 4, the message names step 2, and no LoRA is written from the poisoned weights."""
    from helpers.train import step as train_mod

    real_loss = train_mod.DiffusionStep.loss
    calls = {"n": 0}

    def nan_at_two(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_mod.DiffusionStep, "loss", nan_at_two)
    events = []
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, cache_latents=True, max_train_steps=8, log_every_n_steps=4,
                   save_state_every_n_steps=None, save_every_n_steps=4)
    with pytest.raises(TrainingError, match="The loss became NaN or infinite at step 2"):
        train(cfg, progress=False, on_event=lambda kind, data: events.append((kind, data.get("step"))))
    assert calls["n"] == 4  # ran on to the check at step 4, no further
    assert not any(kind in ("log", "save") for kind, _ in events)
    assert not list(tmp_path.glob("*.safetensors"))


def test_stop_policy_reads_nothing_back_between_logs(tiny_sd15_dir, concept_dir, tmp_path, monkeypatch):
    """No host-device sync per step: the number of tensor reads (.item, .tolist, bool, float, int) does not grow
    with the number of steps between two logs. Adam's step counters are left out: torch keeps them on the CPU
    (the foreach Adam used on CPU), and the fused Adam used on CUDA keeps them on the GPU and never reads them."""
    import traceback

    reads = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if not any("torch/optim" in f.filename.replace(os.sep, "/") for f in traceback.extract_stack(limit=5)):
                reads["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for steps in (3, 6):  # both within the first epoch (6 steps)
        reads["n"] = 0
        cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path / str(steps), cache_latents=True, max_train_steps=steps,
                       log_every_n_steps=100, save_state_every_n_steps=None, flip_aug=False)
        train(cfg, progress=False)
        counts.append(reads["n"])
    assert counts[0] == counts[1], counts


def test_nan_message_for_fp16_names_bf16_and_the_fp16_vae():
    text = nan_message(120, precision="fp16", learning_rate=1e-4, optimizer="adamw", family="sdxl", vae=None,
                       last_saved=None)
    assert "fp16 overflow" in text and "mixed_precision='bf16'" in text
    assert "madebyollin/sdxl-vae-fp16-fix" in text
    assert text.index("fp16 overflow") < text.index("learning rate too high")  # most likely cause first


# ---- out of memory ------------------------------------------------------------------------------------

def test_out_of_memory_gives_ordered_advice_and_keeps_the_state(tiny_sd15_dir, concept_dir, tmp_path, monkeypatch):
    from helpers.train import step as train_mod

    real_loss = train_mod.DiffusionStep.loss
    calls = {"n": 0}

    def oom_at_step_5(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.DiffusionStep, "loss", oom_at_step_5)
    cfg = make_cfg(tiny_sd15_dir, concept_dir, tmp_path, cache_latents=False, optimizer="adamw")
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=False)
    text = str(err.value)
    assert text.startswith("Out of CUDA memory at step 5.")
    order = ["train_batch_size 4 -> 2, with gradient_accumulation_steps 1 -> 2", "gradient_checkpointing=True",
             "optimizer='adamw8bit'", "cache_latents=True", "resolution 32 -> 24"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert str(tmp_path / "states" / "t-step000004") in text
    assert list_states(tmp_path, "t")[-1].name == "t-step000004"


# ---- full disk --------------------------------------------------------------------------------------

def test_full_disk_while_saving_a_state_stops_with_a_message_and_keeps_the_previous(tiny_sd15_dir, concept_dir,
                                                                                   tmp_path, monkeypatch):
    from helpers.atomic import OutputWriteError

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputWriteError, match="the disk is full"):
        train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path, cache_latents=True), progress=False)
    assert [p.name for p in list_states(tmp_path, "t")] == ["t-step000002"]
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == ["t-step000002"]  # no temp folder left


# ---- two processes ---------------------------------------------------------------------------------

def test_two_process_run_resumes_from_its_state(tiny_sd15_dir, concept_dir, tmp_path):
    """2 CPU processes (gloo): rank 0 writes the states; a second launch resumes from one of them on both
    ranks and ends with the same LoRA as the uninterrupted 2-process run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def launch(cfg: TrainConfig, name: str, *extra: str) -> subprocess.CompletedProcess:
        config = save_config(cfg, tmp_path / f"{name}.toml")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "helpers", "train", "--config", str(config), "--no-progress", *extra]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    # 24 samples / (batch 4 x 2 processes) = 3 steps per epoch; a state at step 2 (mid-epoch) and 4.
    full = make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "full", max_train_steps=6, cache_latents=True,
                    save_state_every_n_steps=2)
    launch(full, "full")
    state = tmp_path / "full" / "states" / "t-step000004"
    assert [p.name for p in list_states(tmp_path / "full", "t")] == ["t-step000002", "t-step000004"]
    proc = launch(full.replace(output_dir=str(tmp_path / "again")), "again", "--resume", str(state))
    assert proc.stdout.count("resuming from") == 1  # rank 0 reports; both ranks resume
    assert_same_lora(tmp_path / "again" / "t.safetensors", tmp_path / "full" / "t.safetensors")


# ---- untrusted files and mismatches --------------------------------------------------------------------

class _Evil:
    """Unpickling this creates a folder: a loader that runs it has executed foreign code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickles_are_refused_and_run_nothing(uninterrupted, tiny_sd15_dir, concept_dir, tmp_path):
    import shutil

    from helpers.formats.lora import load_lora
    from helpers.sd.models import ModelLoadError, load_base
    from helpers.train.state import load_state

    marker = tmp_path / "pwned"
    # a training state whose rng.pt was replaced (torch.save's zip format, as the real file)
    state = tmp_path / "t-step000010"
    shutil.copytree(list_states(uninterrupted.output_dir, "t")[-1], state)
    torch.save({"ranks": [_Evil(str(marker))]}, state / "rng.pt")
    with pytest.raises(ConfigError, match="could not be read safely"):
        load_state(state)
    with pytest.raises(ConfigError, match="could not be read safely"):
        train(make_cfg(tiny_sd15_dir, concept_dir, tmp_path / "out"), progress=False, resume=str(state))
    # a base-model checkpoint in torch.save's zip format
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": _Evil(str(marker))}}, ckpt)
    with pytest.raises(ModelLoadError, match="pickled checkpoint"):
        load_base(str(ckpt))
    # a LoRA as .pt
    lora = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": _Evil(str(marker))}, lora)
    with pytest.raises(ValueError, match="only .safetensors LoRA files are read"):
        load_lora(str(lora), None)
    assert not marker.exists()


def test_changed_dataset_is_detected_in_the_latent_cache(tiny_sd15_dir, concept_dir, tmp_path):
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(concept_dir, data)
    cfg = make_cfg(tiny_sd15_dir, data, tmp_path / "out", max_train_steps=1, cache_latents=True,
                   cache_latents_to_disk=True, flip_aug=False, save_state_every_n_steps=None)
    train(cfg, progress=False)
    image = sorted(data.rglob("*.png"))[0]
    Image.new("RGB", (32, 32), (0, 200, 0)).save(image)  # the user edits one image
    with pytest.warns(UserWarning, match=r"The dataset changed since its latent cache .* 1 cached latent\(s\) no "
                                         rf"longer match \(the image file changed\): {image.name}"):
        train(cfg, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dataset changed")  # the refreshed cache is used silently
        train(cfg, progress=False)
