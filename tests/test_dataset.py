"""Tests for helpers.data.dataset: folders and captions, sd-scripts buckets, crops, caption augmentation,
deterministic sampling and the latent cache (memory and disk)."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data.decode import IMAGE_EXTENSIONS
from helpers.data.dataset import (
    BucketBatchSampler, CaptionProcessor, ImageItem, TrainDataset, bucket_table, collate,
    image_to_tensor, load_image, load_image_folder, make_buckets, resize_and_crop, select_bucket
)


def make_image(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    """A random-noise image (so different crops/flips give different pixels)."""
    rng = np.random.default_rng(seed)
    w, h = size
    channels = 4 if mode == "RGBA" else 3
    array = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


# Small buckets for fast tests: resolution 64, min 32, max 128, step 16.
SMALL = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
SIZES = [(80, 60), (60, 80), (64, 64), (120, 40), (50, 50), (100, 70)]


def small_items(tmp_path: Path, repeats: int = 1, sizes=SIZES, is_class: bool = False) -> list[ImageItem]:
    items = []
    for k, size in enumerate(sizes):
        p = make_image(tmp_path / "imgs" / f"img{k}.png", size, seed=k)
        items.append(ImageItem(path=p, caption=f"sks, tag{k}a, tag{k}b, tag{k}c, tag{k}d", repeats=repeats,
                               is_class=is_class))
    return items


# ---------------------------------------------------------------------------------------------
# Folders and captions
# ---------------------------------------------------------------------------------------------

def test_load_image_folder_kohya_layout_and_captions(tmp_path):
    root = tmp_path / "data"
    make_image(root / "top.png", (40, 30))
    (root / "top.txt").write_text("  top caption, red \n", encoding="utf-8")
    make_image(root / "10_sks flower" / "b.jpg", (30, 40))
    (root / "10_sks flower" / "b.txt").write_text("\ufeffsks flower, ümlaut", encoding="utf-8")  # BOM + UTF-8
    make_image(root / "10_sks flower" / "a.PNG", (30, 30))                          # upper-case ext, no caption
    make_image(root / "3_other" / "c.webp", (20, 20))
    make_image(root / "notrepeats" / "d.png", (20, 20))                             # skipped: no "<N>_"
    make_image(root / ".ipynb_checkpoints" / "e.png", (20, 20))                     # hidden: skipped
    (root / "readme.md").write_text("not an image")

    items = load_image_folder(root, default_repeats=2)
    rel = [p.path.relative_to(root).as_posix() for p in items]
    assert rel == ["10_sks flower/a.PNG", "10_sks flower/b.jpg", "3_other/c.webp", "top.png"]
    by_name = {p.path.name: p for p in items}
    assert by_name["top.png"].repeats == 2 and by_name["top.png"].caption == "top caption, red"
    assert by_name["b.jpg"].repeats == 10 and by_name["b.jpg"].caption == "sks flower, ümlaut"
    # No caption file in a kohya folder: the folder's name part is the caption (as in sd-scripts) ...
    assert by_name["a.PNG"].caption == "sks flower"
    assert by_name["c.webp"].repeats == 3 and by_name["c.webp"].caption == "other"
    assert not any(p.is_class for p in items)
    # ... unless a default caption is given; is_class is carried through.
    items2 = load_image_folder(root, default_caption="a photo", is_class=True)
    assert {p.path.name: p.caption for p in items2}["a.PNG"] == "a photo"
    assert {p.path.name: p.caption for p in items2}["b.jpg"] == "sks flower, ümlaut"
    assert all(p.is_class for p in items2)
    assert load_image_folder(root) == load_image_folder(root)  # deterministic


def test_load_image_folder_caption_extension_and_errors(tmp_path):
    make_image(tmp_path / "x.png", (20, 20))
    (tmp_path / "x.caption").write_text("from caption file")
    assert load_image_folder(tmp_path, caption_extension="caption")[0].caption == "from caption file"
    assert load_image_folder(tmp_path)[0].caption == ""
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="file"):
        load_image_folder(tmp_path / "x.png")
    assert ".png" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS


def test_load_image_rgba_and_exif_rotation(tmp_path):
    # Fully transparent pixels become white, not black.
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert img.mode == "RGB" and img.size == (12, 10)
    assert np.asarray(img).min() == 255
    # EXIF orientation 6 (rotate 90): a 40x20 stored image loads as 20x40, and the dataset sees 20x40.
    im = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)
    ds = TrainDataset([ImageItem(tmp_path / "r.jpg", "x")], **SMALL)
    assert ds[0]["original_size"] == (40, 20)


# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------

def test_make_buckets_matches_sd_scripts_512():
    # The list sd-scripts' make_bucket_resolutions((512, 512), 256, 1024, 64) returns.
    expected = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
                (1024, 256)]
    assert make_buckets(512, 256, 1024, 64) == expected
    assert make_buckets() == expected  # sd-scripts' defaults: min 256, max 1024, step 64
    # Every bucket is within the area budget and a multiple of the step.
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in expected)


def test_make_buckets_sdxl():
    # sd-scripts uses the same defaults (256/1024/64) for SDXL: the long side is capped at 1024.
    default = make_buckets(1024, 256, 1024, 64)
    assert len(default) == 25
    assert default[0] == (256, 1024) and default[-1] == (1024, 1024) and (1024, 512) in default
    # The usual SDXL setting, max_bucket_reso=2048, gives the familiar SDXL buckets.
    wide = make_buckets(1024, 256, 2048, 64)
    assert len(wide) == 41
    for bucket in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536), (640, 1600),
                   (256, 2048), (2048, 512)]:
        assert bucket in wide
    assert wide == sorted(wide)
    assert all(w * h <= 1024 * 1024 for w, h in wide)
    # Non-square resolution is (width, height).
    assert (576, 576) in make_buckets((512, 768)) and len(make_buckets((512, 768))) == 19
    with pytest.raises(ValueError, match="max bucket size"):
        make_buckets(1024, 256, 768)


def test_select_bucket_nearest_ratio():
    buckets = make_buckets(512)
    assert select_bucket(1000, 1000, buckets, 512) == (512, 512)
    assert select_bucket(640, 480, buckets, 512) == (576, 448)   # 1.333 -> 1.286 (vs 1.667)
    assert select_bucket(480, 640, buckets, 512) == (448, 576)
    assert select_bucket(1920, 1080, buckets, 512) == (640, 384)  # 1.778 -> 1.667
    assert select_bucket(3000, 500, buckets, 512) == (1024, 256)  # extreme ratio -> most extreme bucket
    assert select_bucket(704, 320, buckets, 512) == (704, 320)    # exact bucket size is kept
    for w, h in [(123, 457), (800, 600), (333, 334), (2000, 700)]:
        chosen = select_bucket(w, h, buckets, 512)
        best = min(abs(bw / bh - w / h) for bw, bh in buckets)
        assert abs(chosen[0] / chosen[1] - w / h) == best


def test_select_bucket_no_upscale():
    # Smaller than resolution^2: own size rounded down to the step, never upscaled.
    assert select_bucket(300, 200, [], 512, no_upscale=True) == (256, 192)
    assert select_bucket(512, 512, [], 512, no_upscale=True) == (512, 512)
    assert select_bucket(40, 30, [], 512, no_upscale=True) == (64, 64)  # never a 0-pixel side
    # Larger: shrunk to area resolution^2 keeping the ratio (724x362), then the side whose rounding
    # keeps the ratio better is rounded (320 -> 640x320, ratio 2.0, beats 704 -> 704x320, ratio 2.2).
    assert select_bucket(2000, 1000, [], 512, no_upscale=True) == (640, 320)
    assert select_bucket(1000, 3000, [], 512, no_upscale=True) == (256, 768)  # 295.6 -> 256, 256*3 = 768


def test_resize_and_crop_center_and_random():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8))
    out, (top, left) = resize_and_crop(img, (64, 64))
    assert out.size == (64, 64)
    assert (top, left) == (0, (128 - 64) // 2)  # resized to 128x64, centred horizontally
    out, (top, left) = resize_and_crop(img, (96, 32))  # wider bucket: width fits, height cropped
    assert out.size == (96, 32) and (top, left) == ((48 - 32) // 2, 0)
    # Same-size image: untouched.
    same, crop = resize_and_crop(img, (200, 100))
    assert crop == (0, 0) and np.array_equal(np.asarray(same), np.asarray(img))
    # Random crops: deterministic for a seed, and they move.
    a = resize_and_crop(img, (64, 64), "random", random.Random(1))
    b = resize_and_crop(img, (64, 64), "random", random.Random(1))
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    lefts = {resize_and_crop(img, (64, 64), "random", random.Random(s))[1][1] for s in range(20)}
    assert len(lefts) > 3 and all(0 <= x <= 64 for x in lefts)
    with pytest.raises(ValueError):
        resize_and_crop(img, (64, 64), "middle")


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

CAP = "sks, red flower, vase, table, window, sunlight"


def test_caption_keep_tokens_and_shuffle_deterministic():
    proc = CaptionProcessor(shuffle=True, keep_tokens=2)
    outs = [proc(CAP, random.Random(s)) for s in range(30)]
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "red flower"]
        assert sorted(tags[2:]) == sorted(["vase", "table", "window", "sunlight"])
    assert len(set(outs)) > 5  # actually permutes
    assert proc(CAP, random.Random(7)) == proc(CAP, random.Random(7))
    # Without augmentation the caption is returned as is (first line only, as sd-scripts).
    assert CaptionProcessor()("a photo of sks flower,  in a vase\nsecond line", random.Random(0)) == \
        "a photo of sks flower,  in a vase"
    assert not CaptionProcessor().is_random and proc.is_random


def test_caption_dropout_and_tag_dropout():
    assert CaptionProcessor(dropout=1.0)(CAP, random.Random(0)) == ""
    assert CaptionProcessor(dropout=0.0)(CAP, random.Random(0)) == CAP
    half = CaptionProcessor(dropout=0.5)
    n_empty = sum(half(CAP, random.Random(s)) == "" for s in range(200))
    assert 60 < n_empty < 140
    # Tag dropout 1.0 drops every non-kept tag; kept tags survive.
    assert CaptionProcessor(keep_tokens=1, tag_dropout=1.0)(CAP, random.Random(0)) == "sks"
    proc = CaptionProcessor(keep_tokens=1, tag_dropout=0.5)
    lengths = [len(proc(CAP, random.Random(s)).split(", ")) for s in range(100)]
    assert min(lengths) >= 1 and max(lengths) <= 6 and 2.5 < sum(lengths) / 100 < 4.5
    for s in range(20):  # order of surviving tags is kept when not shuffling
        tags = proc(CAP, random.Random(s)).split(", ")
        assert tags[0] == "sks" and tags == [t for t in CAP.split(", ") if t in tags]


def test_caption_keep_tokens_separator():
    proc = CaptionProcessor(shuffle=True, keep_tokens_separator="|||")
    cap = "sks, flower ||| a, b, c, d ||| masterpiece"
    for s in range(10):
        tags = proc(cap, random.Random(s)).split(", ")
        assert tags[:2] == ["sks", "flower"] and tags[-1] == "masterpiece"
        assert sorted(tags[2:-1]) == ["a", "b", "c", "d"]
    assert CaptionProcessor(keep_tokens_separator="|||")(cap, random.Random(0)) == \
        "sks, flower, a, b, c, d, masterpiece"


# ---------------------------------------------------------------------------------------------
# Dataset, sampler, collate
# ---------------------------------------------------------------------------------------------

def test_dataset_entries_buckets_and_example(tmp_path):
    items = small_items(tmp_path, repeats=2)
    ds = TrainDataset(items, **SMALL)
    assert len(ds) == 2 * len(items)
    allowed = make_buckets(64, 32, 128, 16)
    for i in range(len(ds)):
        assert ds.bucket_of(i) in allowed
    ex = ds[2]  # item 1 (60x80), first repeat
    w, h = ds.bucket_of(2)
    assert ex["pixel_values"].shape == (3, h, w) and ex["pixel_values"].dtype == torch.float32
    assert -1.0 <= ex["pixel_values"].min() and ex["pixel_values"].max() <= 1.0
    assert ex["original_size"] == (80, 60) and ex["target_size"] == (h, w) and ex["index"] == 2
    assert ex["caption"] == items[1].caption and ex["is_class"] is False
    assert sum(c for _, c in bucket_table(ds)) == len(ds)
    assert bucket_table(ds) == sorted(bucket_table(ds))
    # The pixels are exactly resize_and_crop of the loaded image.
    expected, crop = resize_and_crop(load_image(items[1].path), (w, h))
    assert torch.equal(ex["pixel_values"], image_to_tensor(expected)) and ex["crop_top_left"] == crop
    # No bucketing: every image is resolution x resolution.
    flat = TrainDataset(items, resolution=48, enable_bucket=False)
    assert {flat.bucket_of(i) for i in range(len(flat))} == {(48, 48)}
    assert flat[0]["pixel_values"].shape == (3, 48, 48)
    # no_upscale: a 50x50 image is not upscaled to 64.
    nu = TrainDataset(items, resolution=64, bucket_no_upscale=True, bucket_reso_steps=16)
    assert nu.bucket_of(8) == (48, 48)
    with pytest.raises(ValueError, match="no images"):
        TrainDataset([], **SMALL)


def test_dataset_determinism_and_flip(tmp_path):
    items = small_items(tmp_path, repeats=3)
    kw = dict(SMALL, flip=True, caption_processor=CaptionProcessor(shuffle=True, keep_tokens=1), seed=5)
    a, b = TrainDataset(items, **kw), TrainDataset(items, **kw)
    order = list(range(len(a)))
    reverse = order[::-1]
    ex_a = {i: a[i] for i in order}
    ex_b = {i: b[i] for i in reverse}  # access order does not matter
    for i in order:
        assert ex_a[i]["caption"] == ex_b[i]["caption"]
        assert torch.equal(ex_a[i]["pixel_values"], ex_b[i]["pixel_values"])
        assert ex_a[i]["crop_top_left"] == ex_b[i]["crop_top_left"]
    # Flips happen for some entries and not others; a flipped entry is the mirror of the plain image.
    plain = TrainDataset(items, **SMALL)
    flipped = [i for i in order if not torch.equal(ex_a[i]["pixel_values"], plain[i]["pixel_values"])]
    assert 0 < len(flipped) < len(order)
    for i in flipped:
        assert torch.equal(ex_a[i]["pixel_values"], plain[i]["pixel_values"].flip(-1))
    # Another epoch gives other captions/flips; coming back to the epoch reproduces it.
    a.set_epoch(1)
    assert [a[i]["caption"] for i in order] != [ex_a[i]["caption"] for i in order]
    a.set_epoch(0)
    assert [a[i]["caption"] for i in order] == [ex_a[i]["caption"] for i in order]
    # Another seed differs too.
    c = TrainDataset(items, **dict(kw, seed=6))
    assert [c[i]["caption"] for i in order] != [ex_a[i]["caption"] for i in order]


def test_flip_crop_coordinates(tmp_path):
    # A 201x40 image goes to the widest bucket, 128x32; covering it means 161x32, so 33 columns are
    # cropped: crop_left 16 plain, and in the mirrored resized image the same pixels start at 161-16-128 = 17.
    p = make_image(tmp_path / "wide.png", (201, 40))
    ds = TrainDataset([ImageItem(p, "x", repeats=40)], resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                      bucket_reso_steps=16, flip=True)
    assert ds.bucket_of(0) == (128, 32)
    plain = TrainDataset([ImageItem(p, "x")], resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                         bucket_reso_steps=16)[0]
    assert plain["crop_top_left"] == (0, 16)
    seen = {}
    for i in range(len(ds)):
        ex = ds[i]
        is_flipped = not torch.equal(ex["pixel_values"], plain["pixel_values"])
        seen.setdefault(is_flipped, set()).add(ex["crop_top_left"])
    assert seen == {False: {(0, 16)}, True: {(0, 17)}}


def test_bucket_batch_sampler(tmp_path):
    items = small_items(tmp_path, repeats=3) + small_items(tmp_path / "cls", repeats=1, is_class=True)
    ds = TrainDataset(items, **SMALL)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))  # every entry once
    for batch in batches:
        assert len({ds.bucket_of(i) for i in batch}) == 1
        assert 1 <= len(batch) <= 2
    # Class and instance entries share batches when they share a bucket.
    assert any(len({ds.item_of(i).is_class for i in b}) == 2 for b in batches)
    # Pure function of (seed, epoch).
    again = BucketBatchSampler(ds, batch_size=2, seed=1)
    assert list(again) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    assert list(BucketBatchSampler(ds, batch_size=2, seed=2)) != batches
    # drop_last keeps only full batches; no shuffle keeps bucket order and index order.
    dl = BucketBatchSampler(ds, batch_size=2, seed=1, drop_last=True)
    assert all(len(b) == 2 for b in dl) and len(list(dl)) == len(dl)
    ordered = list(BucketBatchSampler(ds, batch_size=100, shuffle=False))
    assert [ds.bucket_of(b[0]) for b in ordered] == sorted(ds.buckets)
    assert all(b == sorted(b) for b in ordered)


def test_collate_and_dataloader_with_workers(tmp_path):
    items = small_items(tmp_path, repeats=2)
    ds = TrainDataset(items, **SMALL, flip=True, caption_processor=CaptionProcessor(shuffle=True), seed=3)
    ds.set_epoch(2)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=3)
    sampler.set_epoch(2)
    serial = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2))
    assert len(serial) == len(sampler)
    for s, p in zip(serial, parallel):
        assert s["captions"] == p["captions"] and torch.equal(s["pixel_values"], p["pixel_values"])
        assert torch.equal(s["crop_top_left"], p["crop_top_left"])
    batch = serial[0]
    b = len(batch["captions"])
    assert batch["pixel_values"].ndim == 4 and batch["pixel_values"].shape[0] == b
    for key in ("original_size", "crop_top_left", "target_size"):
        assert batch[key].dtype == torch.long and batch[key].shape == (b, 2)
    assert batch["is_class"].dtype == torch.bool and batch["index"].tolist() == sampler._batches()[0]
    h, w = batch["target_size"][0].tolist()
    assert batch["pixel_values"].shape[2:] == (h, w)


# ---------------------------------------------------------------------------------------------
# Latent cache
# ---------------------------------------------------------------------------------------------

class FakeEncoder:
    """8x average-pool, then a cumulative sum along the width so that encode(flip(x)) != flip(encode(x))."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.dtype == torch.float32 and pixels.ndim == 4
        assert pixels.min() >= -1 and pixels.max() <= 1
        self.calls += 1
        self.images += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 8).cumsum(-1) * 0.5


def test_cache_latents_in_memory(tmp_path):
    items = small_items(tmp_path, repeats=3)
    ds = TrainDataset(items, **SMALL, flip=True, seed=4)
    plain = TrainDataset(items, **SMALL)
    enc = FakeEncoder()
    ds.cache_latents(enc, batch_size=4, show_progress=False)
    assert enc.images == 2 * len(items)  # each image once, plus its mirror; not once per repeat
    assert enc.calls == 2 * len(bucket_table(plain))  # here every bucket holds <= 4 images: one batch each
    assert ds.latents_cached
    ref = FakeEncoder()
    n_flipped = 0
    for i in range(len(ds)):
        ex = ds[i]
        assert "pixel_values" not in ex
        px = plain[i]["pixel_values"][None]
        w, h = ds.bucket_of(i)
        assert ex["latents"].shape == (3, h // 8, w // 8)
        if torch.equal(ex["latents"], ref(px)[0]):
            assert ex["crop_top_left"] == plain[i]["crop_top_left"]
        else:
            n_flipped += 1
            assert torch.equal(ex["latents"], ref(px.flip(-1))[0])       # encode(flipped image) ...
            assert not torch.equal(ex["latents"], ref(px)[0].flip(-1))   # ... not flipped latents
    assert 0 < n_flipped < len(ds)
    # A second call encodes nothing; collate stacks latents.
    ds.cache_latents(enc, show_progress=False)
    assert enc.images == 2 * len(items)
    batch = collate([ds[i] for i in next(iter(BucketBatchSampler(ds, 2)))])
    assert batch["latents"].ndim == 4 and "pixel_values" not in batch
    with pytest.raises(ValueError, match="mixes"):
        collate([ds[0], plain[0]])


def test_cache_latents_disk_reuse_and_invalidation(tmp_path):
    items = small_items(tmp_path, repeats=3)
    cache = tmp_path / "cache"
    enc = FakeEncoder()
    ds1 = TrainDataset(items, **SMALL, flip=True)
    ds1.cache_latents(enc, cache_dir=cache, batch_size=2, show_progress=False, encoder_id="vae-a")
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == len(items) and not list(cache.glob("*.tmp"))
    assert enc.images == 2 * len(items)

    # Next run: everything comes from disk, bit-identical.
    enc2 = FakeEncoder()
    ds2 = TrainDataset(items, **SMALL, flip=True)
    ds2.cache_latents(enc2, cache_dir=cache, show_progress=False, encoder_id="vae-a")
    assert enc2.calls == 0 and ds2.latents_cached
    for i in range(len(ds1)):
        assert torch.equal(ds1[i]["latents"], ds2[i]["latents"])

    # A modified source image (same size, pixels changed) is re-encoded; the others are not.
    changed = items[2].path
    stat = changed.stat()
    make_image(changed, SIZES[2], seed=99)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    enc3 = FakeEncoder()
    ds3 = TrainDataset(items, **SMALL, flip=True)
    ds3.cache_latents(enc3, cache_dir=cache, show_progress=False, encoder_id="vae-a")
    assert enc3.images == 2  # the changed image and its mirror
    idx = ds3.entries.index(2)
    plain = TrainDataset(items, **SMALL)[idx]["pixel_values"][None]
    got = ds3[idx]["latents"]
    assert torch.equal(got, FakeEncoder()(plain)[0]) or torch.equal(got, FakeEncoder()(plain.flip(-1))[0])

    # A corrupt cache file is re-encoded, not trusted and not fatal.
    target = sorted(cache.glob("img0-*.safetensors"))[0]
    target.write_bytes(b"garbage")
    enc4 = FakeEncoder()
    TrainDataset(items, **SMALL, flip=True).cache_latents(enc4, cache_dir=cache, show_progress=False,
                                                          encoder_id="vae-a")
    assert enc4.images == 2

    # Another encoder id (other VAE / scaling) invalidates everything.
    enc5 = FakeEncoder()
    TrainDataset(items, **SMALL, flip=True).cache_latents(enc5, cache_dir=cache, show_progress=False,
                                                          encoder_id="vae-b")
    assert enc5.images == 2 * len(items)

    # A cache written without flips does not serve a dataset that needs them.
    cache2 = tmp_path / "cache2"
    TrainDataset(items, **SMALL).cache_latents(FakeEncoder(), cache_dir=cache2, show_progress=False)
    enc6 = FakeEncoder()
    TrainDataset(items, **SMALL, flip=True).cache_latents(enc6, cache_dir=cache2, show_progress=False)
    assert enc6.images == 2 * len(items)


def test_cache_latents_rejects_random_crop_and_bad_encoder(tmp_path):
    items = small_items(tmp_path, sizes=[(80, 60)])
    with pytest.raises(ValueError, match="random_crop"):
        TrainDataset(items, **SMALL, random_crop=True).cache_latents(FakeEncoder(), show_progress=False)
    with pytest.raises(ValueError, match="encode_fn"):
        TrainDataset(items, **SMALL).cache_latents(lambda x: x[0], show_progress=False)


def test_missing_and_empty_captions_warn_with_counts_and_kohya_folders_fall_back_to_their_name(tmp_path):
    sub = tmp_path / "3_sks flower"
    sub.mkdir()
    for folder, name, caption in [(tmp_path, "a", None), (tmp_path, "b", "a red circle"), (sub, "c", None),
                                  (sub, "d", "")]:
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
        if caption is not None:
            (folder / f"{name}.txt").write_text(caption)
    with pytest.warns(UserWarning) as record:
        items = load_image_folder(tmp_path)
    captions = {Path(i.path).name: i.caption for i in items}
    assert captions == {"a.png": "", "b.png": "a red circle", "c.png": "sks flower", "d.png": ""}
    text = " ".join(str(w.message) for w in record)
    assert "2 of the 4 images" in text and "(e.g. c.png, a.png)" in text  # sorted by path: 3_sks flower/ first
    assert "1 in '<repeats>_<name>' folders use the folder's name as caption" in text
    assert "1 caption file(s) are empty (e.g. d.png); 2 image(s) train with an empty caption" in text
    assert "python -m helpers tag" in text


def test_a_caption_extension_that_matches_nothing_says_what_the_files_end_in(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("sks flower")
    with pytest.warns(UserWarning, match=r"no \.txt caption file beside any of the 1 images .*\.caption"):
        load_image_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image_folder(tmp_path, caption_extension=".caption")[0].caption == "sks flower"
