"""benchmarks/vs_diffusers.py and benchmarks/gpu_suite.py in their smallest CPU modes (not timed), so they cannot
rot: our side of the side-by-side runs through the real trainer CLI, and the suite names scripts that exist."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_per_step_time_is_the_difference_of_two_run_lengths():
    vs = _load("vs_diffusers")
    r = vs.Result("x", runs=[(25, 30.0), (225, 130.0), (25, 32.0), (225, 128.0)])
    assert r.per_step() == pytest.approx([0.5, 0.48])


def test_both_command_lines_train_the_same_settings(tmp_path):
    vs = _load("vs_diffusers")
    s = vs.Settings()
    ref = vs.reference_command(Path("ex.py"), Path("m"), Path("d"), tmp_path, s, 25)
    ours = vs.ours_command(Path("m"), Path("d"), tmp_path, s, 25, cache_latents=False)
    assert {"--resolution=32", "--train_batch_size=32", "--rank=8", "--max_train_steps=25",
            "--mixed_precision=no"} <= set(ref)
    pairs = dict(zip(ours[::1], ours[1:]))
    assert pairs["--resolution"] == "32" and pairs["--train-batch-size"] == "32" and pairs["--rank"] == "8"
    assert pairs["--alpha"] == "8.0" and pairs["--target"] == "attention" and pairs["--max-train-steps"] == "25"
    assert "--no-cache-latents" in ours


@pytest.mark.slow
def test_tiny_side_by_side_runs_our_trainer_twice(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_diffusers.py"), "--tiny", "--ours-only",
                          "--repeats", "1", "--json", str(tmp_path / "vs.json")], capture_output=True, text=True,
                         env=env, cwd=str(ROOT), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| ours, equal work (no latent cache) |" in out.stdout and "| ours, defaults (latent cache) |" in out.stdout
    import json

    runs = json.loads((tmp_path / "vs.json").read_text())["results"]
    assert [len(r["runs"]) for r in runs] == [2, 2]


def test_gpu_suite_lists_parts_whose_scripts_exist(tmp_path, capsys):
    suite = _load("gpu_suite")
    parts = suite.parts(Path("example.py"), tmp_path)
    assert [name for name, _, _ in parts] == ["train_step", "train_step_options", "memory", "vs_diffusers"]
    for _, cmd, limit in parts:
        assert Path(cmd[1]).is_file() and limit > 0
    assert sum(limit for _, _, limit in parts) <= 10 * 60        # the suite fits in 10 minutes
    suite.main(["--dry-run", "--json", str(tmp_path / "gpu.json")])
    assert "== memory" in capsys.readouterr().out


def test_step_parts_times_each_part_of_the_step(capsys):
    """benchmarks/step_parts.py in its smallest mode (not timed): every part of the example's step is timed and
    the table's shares add up to the whole."""
    parts = _load("step_parts")
    times = parts.main(["--tiny"])
    assert list(times) == ["VAE encode", "text encoder", "UNet forward + backward + AdamW"]
    assert all(s > 0 for s in times.values())
    table = capsys.readouterr().out
    assert "| all (the example's step: it runs every part) |" in table
    rows = [line for line in table.splitlines() if line.split("|")[1:2] and line.split("|")[1].strip() in times]
    shares = [int(line.split("|")[3].strip().rstrip("%")) for line in rows]
    assert len(shares) == 3
    assert abs(sum(shares) - 100) <= 2   # rounded shares
