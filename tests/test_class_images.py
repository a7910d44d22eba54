"""Tests for helpers.train.class_images: topping a folder up to n class images, resuming without redoing
existing ones, seed-per-index determinism, captions and A1111 parameters, and argument errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.train.class_images import generate_class_images
from helpers.formats.png_info import read_png_parameters

PROMPT = "a photo of a flower"
STEPS = 2


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir):
    from helpers.sd.models import load_base

    return load_base(str(tiny_sd15_dir)).pipe


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_generate_then_resume_matches_a_fresh_run(pipe, tmp_path):
    out = tmp_path / "class"
    made = generate_class_images(pipe, PROMPT, out, 3, steps=STEPS, seed=7, batch_size=2, progress=False)
    assert made == [out / f"class_{i:05d}.png" for i in range(3)]
    assert _names(out) == ["class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt",
                           "class_00002.png", "class_00002.txt"]
    for i, path in enumerate(made):
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == PROMPT
        params = read_png_parameters(path)
        assert params == f"{PROMPT}\nSteps: {STEPS}, Sampler: Euler a, CFG scale: 7, Seed: {7 + i}, Size: 32x32"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (32, 32)
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in made}
    assert len({data for _, data in first.values()}) == 3  # different seeds, different images

    more = generate_class_images(pipe, PROMPT, out, 5, steps=STEPS, seed=7, batch_size=2, progress=False)
    assert more == [out / "class_00003.png", out / "class_00004.png"]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in made} == first  # untouched
    assert len(_names(out)) == 10
    assert "Seed: 11," in read_png_parameters(out / "class_00004.png")

    assert generate_class_images(pipe, PROMPT, out, 5, steps=STEPS, seed=7, progress=False) == []
    assert generate_class_images(pipe, PROMPT, out, 2, steps=STEPS, seed=7, progress=False) == []

    # One run of 5 gives the same bytes for every index as the two runs (3, then 2 more).
    fresh = tmp_path / "fresh"
    generate_class_images(pipe, PROMPT, fresh, 5, steps=STEPS, seed=7, batch_size=2, progress=False)
    assert _names(fresh) == _names(out)
    for i in range(5):
        name = f"class_{i:05d}.png"
        assert (fresh / name).read_bytes() == (out / name).read_bytes(), name

    # Another batch size: the same image up to float rounding of batched kernels (<= 1/255 per pixel),
    # while another seed gives a different image.
    alone = tmp_path / "alone"
    generate_class_images(pipe, PROMPT, alone, 1, steps=STEPS, seed=7, batch_size=1, progress=False)
    pixels = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)  # noqa: E731
    assert np.abs(pixels(alone / "class_00000.png") - pixels(out / "class_00000.png")).max() <= 1
    assert np.abs(pixels(out / "class_00001.png") - pixels(out / "class_00000.png")).max() > 10


def test_existing_images_count_and_gaps_are_filled(pipe, tmp_path):
    out = tmp_path / "class"
    out.mkdir()
    Image.new("RGB", (32, 32), "red").save(out / "mine.jpg")
    Image.new("RGB", (32, 32), "blue").save(out / ".hidden.png")  # hidden: does not count
    Image.new("RGB", (32, 32), "green").save(out / "class_00001.png")
    # 2 images count, so 1 more is needed: index 0 (index 1 exists, so it is skipped).
    made = generate_class_images(pipe, PROMPT, out, 3, steps=STEPS, progress=False)
    assert made == [out / "class_00000.png"]
    assert (out / "class_00001.txt").read_text(encoding="utf-8") == PROMPT  # its lost caption is restored
    assert not (out / "mine.txt").exists()  # images not ours are left alone
    made = generate_class_images(pipe, PROMPT, out, 5, steps=STEPS, progress=False)
    assert made == [out / "class_00002.png", out / "class_00003.png"]


def test_interrupted_image_without_png_is_redone(pipe, tmp_path):
    out = tmp_path / "class"
    out.mkdir()
    (out / "class_00000.txt").write_text(PROMPT)  # caption written, killed before the PNG
    made = generate_class_images(pipe, "  a photo   of a flower ", out, 1, steps=STEPS, progress=False)
    assert made == [out / "class_00000.png"]
    assert read_png_parameters(made[0]).startswith(PROMPT + "\n")
    assert (out / "class_00000.txt").read_text(encoding="utf-8") == PROMPT


def test_enough_images_needs_no_pipeline(tmp_path):
    out = tmp_path / "class"
    out.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(out / f"img{i}.png")
    assert generate_class_images(None, PROMPT, out, 2) == []
    assert generate_class_images(None, PROMPT, tmp_path / "new", 0) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"n": -1}, "n .* >= 0"),
    ({"n": 2.5}, "integer"),
    ({"class_prompt": "   "}, "class_prompt"),
    ({"batch_size": 0}, "batch_size"),
    ({"steps": 0}, "steps"),
    ({"sampler": "Euler b"}, "unknown sampler"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, match):
    args = {"class_prompt": PROMPT, "n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_class_images(None, args.pop("class_prompt"), tmp_path / "out", args.pop("n"), **args)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        generate_class_images(None, PROMPT, tmp_path / "f", 1)
