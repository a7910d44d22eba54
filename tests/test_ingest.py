"""Tests for helpers.data.prepare: a corpus of good and bad files built with PIL in tmp_path goes through
`prepare`; every bad file is reported with its reason, conversions are right, the source is untouched,
subject-aware crops keep an off-centre subject, duplicates are grouped, buckets are counted as
select_bucket does, and drop_images / restore_images move files and update the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.config import ConfigError, config_from_dict, config_to_toml
from helpers.data.dataset import load_image_folder, make_buckets, select_bucket
from helpers.data.records import DROPPED_DIR, MANIFEST_JSON, load_manifest
from helpers.data.decode import HEIC_MISSING, NOT_AN_IMAGE, heic_supported
from helpers.config import PrepareConfig
from helpers.data.duplicates import clip_embeddings, hamming, load_clip, perceptual_hash
from helpers.data.prepare import drop_images, prepare, restore_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Corpus builders
# ---------------------------------------------------------------------------------------------

def photo(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field with a few shapes; different seeds look different."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB")
    img = low.resize((w, h), Image.Resampling.BICUBIC)
    a = np.asarray(img).copy()
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h * 3 // 4))
        a[y0:y0 + h // 5, x0:x0 + w // 6] = rng.integers(0, 256, 3)
    return Image.fromarray(a, "RGB")


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 MP) that compresses to a few tens of KB."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (hidden files included)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def build_corpus(root: Path) -> dict[str, str]:
    """Good files of every format and bad files of every kind; returns {source file: expected reason fragment}
    for every file that must be rejected or skipped."""
    root.mkdir(parents=True)
    photo(1).save(root / "photo_jpg.jpg", quality=90)
    photo(2).save(root / "photo_png.png")
    (root / "photo_png.txt").write_text("a photo, sks", encoding="utf-8")
    photo(3).save(root / "photo.webp", quality=90)
    photo(4).save(root / "photo.bmp")
    photo(5).save(root / "photo.tiff")
    # animated GIF: first frame red, second blue
    frames = [Image.new("RGB", (300, 300), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("CMYK", (320, 300), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)  # red in CMYK
    pal = Image.new("P", (320, 300), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(1, (160, 0, 320, 300))  # right half green, left half index 0 = transparent
    pal.save(root / "palette_alpha.png", transparency=0)
    Image.fromarray(np.tile(np.linspace(0, 255, 320).astype(np.uint8), (300, 1)), "L").save(root / "grey.png")
    deep = np.tile(np.linspace(0, 65535, 320).astype(np.uint16), (300, 1))
    Image.fromarray(deep).save(root / "deep16.png")  # mode I;16
    rgba = np.zeros((300, 320, 4), np.uint8)
    rgba[:, 160:] = (0, 0, 255, 255)  # right half opaque blue; left half fully transparent black
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    # EXIF orientation 6: stored 400x300 landscape with a red marker top-left; shown as 300x400 portrait,
    # the marker top-right.
    stored = Image.new("RGB", (400, 300), (40, 40, 40))
    stored.paste((255, 0, 0), (0, 0, 60, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.new("RGB", (200, 150), (10, 120, 200)).save(root / "small.png")  # above min_size, below target
    photo(6).save(root / "bad_caption.png")
    (root / "bad_caption.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # binary, not text
    photo(11).save(root / "cp1252_caption.png")
    (root / "cp1252_caption.txt").write_bytes("a red \u00e9t\u00e9 flower \u2013 sks".encode("cp1252"))  # Notepad
    kohya = root / "10_sks flower"
    kohya.mkdir()
    photo(7).save(kohya / "flower1.png")
    (kohya / "flower1.txt").write_text("sks flower, red", encoding="utf-8")
    photo(8).save(kohya / "flower2.jpg", quality=90)

    # bad input
    buf = io.BytesIO()
    photo(9).save(buf, format="JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("hello, this is not a picture\n")
    png_bomb(root / "bomb.png")
    Image.new("RGB", (100, 80), (1, 2, 3)).save(root / "tiny.png")
    (root / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(range(200)))
    (root / "truncated.txt").write_text("caption of a broken image", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    (root / "notes.pdf").write_bytes(b"%PDF-1.4\n% notes\n")
    (root / "orphan.txt").write_text("a caption with no image", encoding="utf-8")
    (root / ".ipynb_checkpoints").mkdir()
    photo(10).save(root / ".ipynb_checkpoints" / "photo-checkpoint.png")
    expected = {
        "truncated.jpg": "truncated",
        "empty.png": "empty file",
        "text.jpg": "holds text",
        "bomb.png": "decompression bomb",
        "tiny.png": "too small: 100x80",
        "bad_caption.txt": "binary data",
        "truncated.txt": "caption of a rejected image",
        ".DS_Store": NOT_AN_IMAGE,
        "notes.pdf": NOT_AN_IMAGE,
        "orphan.txt": "caption file without an image",
        ".ipynb_checkpoints/": "hidden folder",
    }
    # without pillow-heif the reason says how to get it; with it, this fake file is rejected as corrupt
    expected["phone.heic"] = "" if heic_supported() else HEIC_MISSING
    return expected


# Small buckets keep the test fast: resolution 256 (min side 128, max 512).
SMALL = dict(resolution=256, min_bucket_reso=128, max_bucket_reso=512, progress=False)


# ---------------------------------------------------------------------------------------------
# The full corpus
# ---------------------------------------------------------------------------------------------

def test_prepare_reports_every_bad_file_converts_formats_and_leaves_source_untouched(tmp_path):
    src = tmp_path / "photos"
    expected = build_corpus(src)
    before = tree_hashes(src)
    out = tmp_path / "prepared"

    report = prepare(src, out, **SMALL)

    # the source folder: identical bytes, no file added or removed
    assert tree_hashes(src) == before

    # every bad file listed with its reason; nothing else rejected or skipped
    problems = {r.source: r for r in report.rejected + report.skipped}
    assert set(problems) == set(expected), sorted(problems)
    for name, fragment in expected.items():
        assert fragment in problems[name].reason, (name, problems[name].reason)
    assert problems[".DS_Store"].status == problems["notes.pdf"].status == "skipped"
    assert problems["truncated.jpg"].status == "rejected"
    assert "20000x20000" in problems["bomb.png"].reason or "400,000,000" in problems["bomb.png"].reason

    # every source file is accounted for: prepared image, consumed caption, or listed problem
    manifest = load_manifest(out)
    by_source = {f["source"]: f for f in manifest["files"]}
    consumed_captions = {r.caption_source for r in report.items if r.caption_source}
    in_hidden = {f for f in before if f.startswith(".ipynb_checkpoints/")}
    assert set(before) - in_hidden == set(by_source) - {".ipynb_checkpoints/"} | consumed_captions
    ok = {r.source: r for r in report.items}
    assert len(ok) == 17

    def prepared(name: str) -> np.ndarray:
        path = out / ok[name].prepared
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.format == "PNG"
            return np.asarray(im).astype(int)

    # EXIF orientation 6: portrait, marker moved to the top-right
    rot = ok["rotated.jpg"]
    assert rot.original_size == (300, 400) and "exif_rotated" in rot.flags
    a = prepared("rotated.jpg")
    assert a.shape[0] > a.shape[1]
    assert np.abs(a[20, -20] - (255, 0, 0)).max() < 40, a[20, -20]
    assert np.abs(a[20, 20] - (40, 40, 40)).max() < 40, a[20, 20]

    # conversions and their flags
    assert "animated" in ok["anim.gif"].flags
    assert np.abs(prepared("anim.gif").mean((0, 1)) - (255, 0, 0)).max() < 3  # the first (red) frame
    assert "cmyk" in ok["cmyk.jpg"].flags and ok["cmyk.jpg"].original_mode == "CMYK"
    assert np.abs(prepared("cmyk.jpg").mean((0, 1)) - (255, 0, 0)).max() < 12
    pa = prepared("palette_alpha.png")
    assert {"palette", "had_alpha"} <= set(ok["palette_alpha.png"].flags)
    assert (pa[:, 5] == 255).all() and np.abs(pa[:, -5] - (0, 200, 0)).max() == 0  # transparent -> white
    ra = prepared("rgba.png")
    assert "had_alpha" in ok["rgba.png"].flags
    assert (ra[:, 5] == 255).all() and (ra[:, -5] == (0, 0, 255)).all()
    g = prepared("grey.png")
    assert "greyscale" in ok["grey.png"].flags and (g[..., 0] == g[..., 2]).all()
    d = prepared("deep16.png")
    assert ok["deep16.png"].original_mode.startswith("I") and "16bit" in ok["deep16.png"].flags
    assert d[:, 0].max() < 10 and d[:, -1].min() > 245 and abs(d[:, d.shape[1] // 2].mean() - 128) < 12

    # smaller than target: kept (not upscaled), flagged, at a no-upscale bucket
    small = ok["small.png"]
    assert "upscale_needed" in small.flags and small in report.smaller_than_target
    assert small.prepared_size == (192, 128)
    assert "smaller than target" in report.summary()

    # captions: copied beside the prepared image; a bad one reported, its image kept without it
    assert (out / "photo_png.txt").read_text(encoding="utf-8") == "a photo, sks"
    assert ok["photo_png.png"].caption == "a photo, sks"
    assert "caption_unreadable" in ok["bad_caption.png"].flags
    assert not (out / "bad_caption.txt").exists()
    # a cp1252 caption is kept, written out as UTF-8, and flagged
    assert "caption_not_utf8" in ok["cp1252_caption.png"].flags
    assert ok["cp1252_caption.png"].caption == "a red \u00e9t\u00e9 flower \u2013 sks"
    assert (out / "cp1252_caption.txt").read_text(encoding="utf-8") == "a red \u00e9t\u00e9 flower \u2013 sks"
    assert "no_caption" in ok["photo.bmp"].flags

    # kohya folder kept: repeats survive into the training loader
    items = load_image_folder(out)
    by_name = {it.path.relative_to(out).as_posix(): it for it in items}
    assert by_name["10_sks flower/flower1.png"].repeats == 10
    assert by_name["10_sks flower/flower1.png"].caption == "sks flower, red"
    assert by_name["10_sks flower/flower2.png"].repeats == 10
    assert len(items) == len(ok)

    # manifest (JSON and CSV), contact sheet, summary
    assert manifest["config"]["resolution"] == 256
    csv_text = (out / "manifest.csv").read_text(encoding="utf-8")
    assert csv_text.count("\n") == len(manifest["files"]) + 1 and "decompression bomb" in csv_text
    with Image.open(report.contact_sheets[0]) as sheet:
        assert sheet.format == "PNG" and sheet.width >= 10 * 160
    text = report.summary()
    for name in expected:
        assert name in text
    assert report.report_text.read_text(encoding="utf-8").startswith("Prepared 1")
    cfg_back = config_from_dict(PrepareConfig, __import__("tomllib").loads(report.config_path.read_text()))
    assert cfg_back == report.config


def test_bucket_table_matches_select_bucket_and_plot_is_png(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sizes = [(480, 360), (360, 480), (400, 400), (640, 240), (500, 375), (300, 500), (200, 150)]
    for k, size in enumerate(sizes):
        photo(20 + k, size).save(src / f"img{k}.png")
    report = prepare(src, tmp_path / "out", **SMALL)
    buckets = make_buckets(256, 128, 512, 64)
    counts: dict = {}
    for r in report.items:
        with Image.open(report.output_dir / r.prepared) as im:
            w, h = im.size
        expected_bucket = select_bucket(*r.original_size, buckets, 256)
        if "upscale_needed" in r.flags:
            expected_bucket = select_bucket(*r.original_size, buckets, 256, no_upscale=True)
        assert (w, h) == expected_bucket == r.bucket
        assert select_bucket(w, h, buckets, 256, no_upscale=True) == r.bucket  # training keeps it as is
        counts[(w, h)] = counts.get((w, h), 0) + 1
    assert report.bucket_table == sorted(counts.items())
    assert sum(n for _, n in report.bucket_table) == len(sizes)
    assert [r.source for r in report.smaller_than_target] == ["img6.png"]

    # with upscaling allowed the small image fills its sd-scripts bucket
    up = prepare(src, tmp_path / "up", **SMALL, allow_upscale=True)
    small = next(r for r in up.items if r.source == "img6.png")
    assert small.prepared_size == select_bucket(200, 150, buckets, 256) == (256, 256)
    assert "upscaled" in small.flags and not up.smaller_than_target
    assert report.bucket_plot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(report.bucket_plot) as im:
        im.verify()


# ---------------------------------------------------------------------------------------------
# Subject-aware crop
# ---------------------------------------------------------------------------------------------

def _scene(size: tuple[int, int], box: tuple[int, int, int, int] | None, seed: int) -> Image.Image:
    """A plain grey background (gentle gradient, faint noise) with a bright textured object in `box`."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(110, 135, w)[None, :, None] + np.zeros((h, 1, 3))
    a = grad + rng.normal(0, 2, (h, w, 3))
    if box is not None:
        x0, y0, x1, y1 = box
        a[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _subject_pixels(a: np.ndarray) -> int:
    return int((np.abs(a.astype(int) - 122).max(axis=-1) > 45).sum())


def test_subject_crop_keeps_an_off_centre_subject_that_centre_crop_loses(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    scenes = {
        "wide_left.png": _scene((1536, 512), (40, 190, 160, 310), 1),      # subject near the left edge
        "tall_bottom.png": _scene((512, 1400), (300, 1230, 420, 1350), 2),  # subject near the bottom
        "plain.png": _scene((1024, 512), None, 3),                          # nothing to find
    }
    for name, img in scenes.items():
        img.save(src / name)
    kept: dict[str, dict[str, float]] = {}
    for crop in ("center", "subject"):
        report = prepare(src, tmp_path / crop, resolution=512, crop=crop, progress=False)
        for r in report.items:
            with Image.open(tmp_path / crop / r.prepared) as im:
                assert im.size == (512, 512)
                total = _subject_pixels(np.asarray(scenes[r.source]))
                if total:
                    kept.setdefault(r.source, {})[crop] = _subject_pixels(np.asarray(im)) / total
                else:
                    kept.setdefault(r.source, {})[crop] = np.asarray(im).astype(float).mean()
    for name in ("wide_left.png", "tall_bottom.png"):
        assert kept[name]["center"] == 0.0, kept
        assert kept[name]["subject"] > 0.99, kept
    # no subject: the subject crop falls back to the centre
    assert abs(kept["plain.png"]["subject"] - kept["plain.png"]["center"]) < 0.01


# ---------------------------------------------------------------------------------------------
# Duplicates, CLIP similarity, drop and restore
# ---------------------------------------------------------------------------------------------

def _dup_source(root: Path) -> Path:
    root.mkdir()
    a = photo(11, (640, 480))
    a.save(root / "A.png")
    shutil.copyfile(root / "A.png", root / "A_copy.png")       # same bytes
    a.save(root / "A.bmp")                                     # same pixels, other format
    a.resize((400, 300), Image.Resampling.LANCZOS).save(root / "A_small.jpg", quality=70)  # near duplicate
    (root / "A_small.txt").write_text("the small one", encoding="utf-8")
    photo(12, (640, 480)).save(root / "B.png")
    photo(13, (480, 640)).save(root / "C.png")
    return root


def test_exact_and_near_duplicates_then_drop_and_restore(tmp_path):
    src = _dup_source(tmp_path / "src")
    Image.open(src / "A.png").convert("L").save(src / "A_grey.png")  # same structure, other colours
    before = tree_hashes(src)
    out = tmp_path / "out"
    report = prepare(src, out, crop="none", progress=False)

    hashes = {r.source: int(r.phash, 16) for r in report.items}
    assert hamming(hashes["A.png"], hashes["A_small.jpg"]) <= 4
    assert hamming(hashes["A.png"], hashes["A_grey.png"]) <= 4  # pHash sees luminance only ...
    assert min(hamming(hashes["A.png"], hashes[o]) for o in ("B.png", "C.png")) > 16

    kinds = {g.kind: g for g in report.duplicate_groups}
    assert set(kinds) == {"exact", "near"} and len(report.duplicate_groups) == 2
    name = {r.source: r.name for r in report.items}
    assert set(kinds["exact"].members) == {name["A.png"], name["A_copy.png"], name["A.bmp"]}
    assert set(kinds["near"].members) == {kinds["exact"].keep, name["A_small.jpg"]}
    assert kinds["near"].scores[name["A_small.jpg"]] <= 4
    # the same stem in two formats gets the extension in its prepared name
    assert {name["A.png"], name["A.bmp"]} == {"A_png.png", "A_bmp.png"}
    for g in report.duplicate_groups:
        with Image.open(g.sheet) as im:
            assert im.format == "PNG" and im.width >= len(g.members) * 200
    flags = {r.source: r.flags for r in report.items}
    assert f"near_duplicate_of:{kinds['exact'].keep}" in flags["A_small.jpg"]
    # ... the colour signature keeps a greyscale copy apart; different pictures are not grouped
    assert not any(f.startswith(("duplicate_of", "near_duplicate_of"))
                   for f in flags["B.png"] + flags["C.png"] + flags["A_grey.png"])
    # by default nothing is dropped
    assert len(report.items) == 7 and not (out / DROPPED_DIR).exists()

    # an unknown name moves nothing
    with pytest.raises(ValueError, match="not-there.png"):
        drop_images(out, [name["A_small.jpg"], "not-there.png"])
    assert (out / name["A_small.jpg"]).exists()

    drops = report.suggested_drops()
    assert set(drops) == {name["A_small.jpg"], *kinds["exact"].others}
    moved = drop_images(out, drops)
    assert sorted(moved) == sorted(drops)
    assert drop_images(out, drops) == []  # running the cell again changes nothing
    for n in drops:
        assert not (out / n).exists() and (out / DROPPED_DIR / n).exists()
    assert (out / DROPPED_DIR / "A_small.txt").read_text(encoding="utf-8") == "the small one"
    assert not (out / "A_small.txt").exists()
    manifest = load_manifest(out)
    status = {f["source"]: (f["status"], f["prepared"]) for f in manifest["files"]}
    assert status["A_small.jpg"] == ("dropped", f"{DROPPED_DIR}/A_small.png")
    assert sum(n for _, n in manifest["bucket_table"]) == 7 - len(drops)
    assert "A_small.jpg,image,dropped" in (out / "manifest.csv").read_text(encoding="utf-8")
    assert len(load_image_folder(out)) == 7 - len(drops)
    assert tree_hashes(src) == before

    # restore puts one back
    assert restore_images(out, ["A_small.png"]) == ["A_small.png"]
    assert (out / "A_small.png").exists() and (out / "A_small.txt").exists()
    assert {f["source"]: f["status"] for f in load_manifest(out)["files"]}["A_small.jpg"] == "ok"
    assert tree_hashes(src) == before


def test_clip_similarity_groups_with_a_tiny_clip(tmp_path):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    clip_dir = tmp_path / "tiny_clip"
    CLIPModel(config).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)

    src = _dup_source(tmp_path / "src")
    model, processor = load_clip(str(clip_dir))
    names = ["A.png", "A_small.jpg", "B.png", "C.png"]
    images = [Image.open(src / n).convert("RGB") for n in names]
    emb = clip_embeddings(images, model, processor)
    assert emb.shape == (4, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3], sim[2, 3])
    threshold = float((sim[0, 1] + max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3], sim[2, 3])) / 2)

    report = prepare(src, tmp_path / "out", crop="none", near_dup_threshold=None, clip_model=str(clip_dir),
                     clip_threshold=threshold, progress=False)
    name = {r.source: r.name for r in report.items}
    clip_groups = [g for g in report.duplicate_groups if g.kind == "clip"]
    exact = [g for g in report.duplicate_groups if g.kind == "exact"][0]
    assert len(clip_groups) == 1 and set(clip_groups[0].members) == {exact.keep, name["A_small.jpg"]}
    assert clip_groups[0].scores[name["A_small.jpg"]] >= threshold
    assert any(f.startswith("clip_similar_to:") for f in
               next(r for r in report.items if r.source == "A_small.jpg").flags)


def test_perceptual_hash_is_robust_to_resize_and_recompression():
    a = photo(31, (800, 600))
    buf = io.BytesIO()
    a.resize((320, 240), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=60)
    b = Image.open(io.BytesIO(buf.getvalue()))
    assert hamming(perceptual_hash(a), perceptual_hash(b)) <= 4
    others = [hamming(perceptual_hash(a), perceptual_hash(photo(s, (800, 600)))) for s in range(40, 48)]
    assert min(others) > 12, others


# ---------------------------------------------------------------------------------------------
# Zip input, safety refusals, pad mode, settings
# ---------------------------------------------------------------------------------------------

def test_zip_source_rejects_zip_slip_and_keeps_kohya_folders(tmp_path):
    zpath = tmp_path / "upload.zip"
    buf = io.BytesIO()
    photo(50).save(buf, format="PNG")
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("dataset/5_sks dog/dog.png", buf.getvalue())
        zf.writestr("dataset/5_sks dog/dog.txt", "sks dog")
        zf.writestr("dataset/extra/cat.png", buf.getvalue())
        zf.writestr("../evil.png", buf.getvalue())
        zf.writestr("/abs/evil2.png", buf.getvalue())
        zf.writestr("__MACOSX/dataset/._cat.png", b"\x00\x05\x16\x07 apple double")
    before = hashlib.sha256(zpath.read_bytes()).hexdigest()
    out = tmp_path / "work" / "prepared"
    report = prepare(zpath, out, **SMALL)
    assert hashlib.sha256(zpath.read_bytes()).hexdigest() == before
    problems = {r.source: r for r in report.rejected + report.skipped}
    assert "zip-slip" in problems["../evil.png"].reason and problems["../evil.png"].status == "rejected"
    assert "zip-slip" in problems["/abs/evil2.png"].reason
    assert problems["__MACOSX/dataset/._cat.png"].reason.startswith(NOT_AN_IMAGE)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "work" / "evil.png").exists()
    prepared = sorted(r.prepared for r in report.items)
    assert prepared == ["5_sks dog/dog.png", "extra__cat.png"]
    assert (out / "5_sks dog" / "dog.txt").read_text(encoding="utf-8") == "sks dog"
    assert {it.path.name: it.repeats for it in load_image_folder(out)} == {"dog.png": 5, "extra__cat.png": 1}


def test_refuses_output_inside_source_and_existing_set_unless_overwrite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(60).save(src / "a.png")
    before = tree_hashes(src)
    for bad in (src, src / "prepared"):
        with pytest.raises(ValueError, match="inside the source"):
            prepare(src, bad, progress=False)
    with pytest.raises(ValueError, match="inside output_dir"):
        prepare(src, tmp_path, progress=False)
    other = tmp_path / "busy"
    other.mkdir()
    (other / "keep.me").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        prepare(src, other, overwrite=True, progress=False)
    assert (other / "keep.me").exists()

    out = tmp_path / "out"
    prepare(src, out, progress=False)
    (out / "stale.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare(src, out, progress=False)
    assert (out / "stale.png").exists()
    photo(61).save(src / "b.png")
    before["b.png"] = hashlib.sha256((src / "b.png").read_bytes()).hexdigest()
    report = prepare(src, out, overwrite=True, progress=False)
    assert not (out / "stale.png").exists() and len(report.items) == 2
    assert not list(tmp_path.glob("out.*"))  # no temp or old folder left beside it
    assert tree_hashes(src) == before


def test_pad_mode_background_jpg_output_and_pixel_limit(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (600, 300), (200, 30, 30)).save(src / "wide.png")
    rgba = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (200, 0, 400, 400))
    rgba.save(src / "half.png")
    Image.new("RGB", (700, 700), (5, 5, 5)).save(src / "big.png")  # 490,000 pixels
    report = prepare(src, tmp_path / "out", resolution=512, crop="pad", background="0,128,0", image_format="jpg",
                     max_pixels=400_000, progress=False)
    rejected = {r.source: r.reason for r in report.rejected}
    assert set(rejected) == {"big.png"} and "decompression bomb" in rejected["big.png"]
    ok = {r.source: r for r in report.items}
    with Image.open(tmp_path / "out" / "wide.jpg") as im:
        assert im.format == "JPEG" and im.size == (512, 512)
        a = np.asarray(im).astype(int)
    assert np.abs(a[10, 256] - (0, 128, 0)).max() < 8          # letterbox band in the background colour
    assert np.abs(a[256, 256] - (200, 30, 30)).max() < 8       # the image in the middle
    assert "padded" in ok["wide.png"].flags
    with Image.open(tmp_path / "out" / "half.jpg") as im:
        h = np.asarray(im).astype(int)
    assert np.abs(h[200, 20] - (0, 128, 0)).max() < 8 and "had_alpha" in ok["half.png"].flags


def test_prepare_config_validation_and_toml_round_trip():
    cfg = PrepareConfig(source="in", output_dir="out", resolution=1024, crop="subject", clip_model="x",
                        near_dup_threshold=-1)
    assert cfg.effective_min_size == 512 and cfg.background_rgb == (255, 255, 255)
    assert config_from_dict(PrepareConfig, __import__("tomllib").loads(config_to_toml(cfg))) == cfg
    for bad, field in ((dict(crop="smart"), "crop"), (dict(resolution=500), "resolution"),
                       (dict(background="nope"), "background"), (dict(near_dup_threshold=65), "near_dup_threshold"),
                       (dict(image_format="gif"), "image_format"), (dict(caption_extension="txt"), "caption_extension"),
                       (dict(resolution=2048), "resolution")):
        with pytest.raises(ConfigError, match=field):
            PrepareConfig(**bad)
    assert json.loads(json.dumps(PrepareConfig().__dict__))["max_pixels"] == 100_000_000
    assert MANIFEST_JSON == "manifest.json"


def test_a_folder_with_the_usual_mistakes_is_caught_and_the_captioned_original_is_kept(tmp_path):
    """write_flawed_files adds an exact copy, a re-saved JPEG, a truncated file and an 8 px thumbnail."""
    from helpers.config import PrepareConfig
    from helpers.data.prepare import prepare_from_config
    from helpers.toy import world

    world.write_concept_dataset(tmp_path / "src", n=4, seed=1)
    world.write_flawed_files(tmp_path / "src")
    report = prepare_from_config(PrepareConfig(source=str(tmp_path / "src"), output_dir=str(tmp_path / "out"),
                                               resolution=32, min_bucket_reso=16, max_bucket_reso=64,
                                               bucket_reso_steps=8), overwrite=True)
    assert len(report.items) == 6
    reasons = {r.source: r.reason for r in report.rejected}
    assert reasons["download_interrupted.png"].startswith("truncated or incomplete file")
    assert reasons["thumbnail.png"] == "too small: 8x8 (short side 8 < min_size 16)"
    kinds = {g.kind: g for g in report.duplicate_groups}
    assert kinds["exact"].keep == "sks_flower_00.png"          # the captioned original, not its copy
    assert kinds["near"].keep == "sks_flower_01.png"
    assert report.suggested_drops() == ["sks_flower_00 (copy).png", "sks_flower_01_resaved.png"]
