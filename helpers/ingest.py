"""Dataset preparation (notebook 01): a user's folder or .zip of photos -> a clean prepared copy and a report.

Every file of the source is accounted for: prepared (converted to RGB, EXIF-rotated, cropped or
bucketed, caption copied beside it), rejected with a reason (corrupt, truncated, empty, too small,
decompression bomb, unsafe zip member, ...) or skipped with a reason (not an image). Exact and near
duplicates are grouped and shown side by side, but nothing is dropped until the user calls
`drop_images`. The source is only ever read; the prepared copy appears atomically.

Layout of the prepared copy (it is directly a training folder for `dataset.load_image_folder`):

    output_dir/
      a.png, a.txt, 10_sks flower/b.png, ...   prepared images and captions (kohya folders kept)
      manifest.json, manifest.csv               one row per source file: status, reason, sizes, flags
      _report/                                  report.txt, prepare_config.toml, contact_sheet_*.png,
                                                buckets.png, duplicates/*.png
      _dropped/                                 images the user dropped with drop_images
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import warnings
import zipfile
import zlib
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageOps, UnidentifiedImageError

from .atomic import OutputWriteError, atomic_dir, atomic_path
from .config import ConfigBase, ConfigError, _check_types, config_to_toml
from .dataset import (_KOHYA_FOLDER, IMAGE_EXTENSIONS, CaptionDecodeError, decode_caption, make_buckets,
                      resize_and_crop, select_bucket)
from .grids import _font

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "sd-lora-helpers/prepared/1"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
REPORT_DIR = "_report"
DROPPED_DIR = "_dropped"

CROP_MODES = ("none", "bucket", "center", "subject", "pad")
IMAGE_FORMATS = ("png", "jpg")
HEIC_EXTENSIONS = frozenset({".heic", ".heif"})
#: Extensions treated as images (anything else is "skipped: not an image").
INGEST_EXTENSIONS = frozenset(IMAGE_EXTENSIONS | {".jpe", ".jfif", ".avif"} | HEIC_EXTENSIONS)
HEIC_MISSING = "HEIC decoder not installed: pip install pillow-heif"
NOT_AN_IMAGE = "not an image"
MAX_FILE_BYTES = 1 << 30  # one source file larger than 1 GiB is refused before it is read

_EXIF_ORIENTATION = 0x0112
_STEP = 64  # side step of sizes kept without upscaling (sd-scripts' bucket_reso_steps)


# =============================================================================================
# Settings
# =============================================================================================

@dataclass
class PrepareConfig(ConfigBase):
    """Every setting of a dataset preparation; plain types, so TOML, the CLI and widgets can build it."""

    source: str = ""                      # a folder (recursive; kohya "N_name" subfolders kept) or a .zip file
    output_dir: str = ""                  # the prepared copy; never inside the source
    resolution: int = 512                 # 512 for SD 1.5, 768 for SD 2, 1024 for SDXL
    crop: str = "bucket"                  # none | bucket | center | subject | pad
    min_size: int | None = None           # shorter side below this is rejected; None: resolution // 2
    max_pixels: int = 100_000_000         # larger declared sizes are rejected as decompression bombs
    max_side: int | None = None           # crop="none" only: cap the long side (downscale)
    allow_upscale: bool = False           # False: images smaller than the target keep their size (flagged)
    background: str = "#ffffff"           # transparency is flattened on it; "pad" fills with it
    caption_extension: str = ".txt"       # caption files beside images; "" to ignore captions
    image_format: str = "png"             # png (lossless) | jpg (quality jpeg_quality, 4:4:4)
    jpeg_quality: int = 95
    near_dup_threshold: int = 10          # max Hamming distance of 64-bit perceptual hashes; -1: off
    clip_model: str | None = None         # CLIP id or folder for embedding similarity; None: off
    clip_threshold: float = 0.95          # cosine similarity at or above which images are grouped
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"crop": CROP_MODES, "image_format": IMAGE_FORMATS}

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        _check_types(self)
        if self.crop not in CROP_MODES:
            raise ConfigError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ConfigError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        for name in ("resolution", "max_pixels", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.min_bucket_reso < self.bucket_reso_steps:
            raise ConfigError(f"min_bucket_reso ({self.min_bucket_reso}) must be at least bucket_reso_steps "
                              f"({self.bucket_reso_steps})")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ConfigError(f"resolution ({self.resolution}) must lie between min_bucket_reso "
                              f"({self.min_bucket_reso}) and max_bucket_reso ({self.max_bucket_reso})")
        if self.min_size is not None and self.min_size < 1:
            raise ConfigError(f"min_size must be a positive integer or None, got {self.min_size!r}")
        if self.max_side is not None and self.max_side < 8:
            raise ConfigError(f"max_side must be >= 8 or None, got {self.max_side!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not -1 <= self.near_dup_threshold <= 64:
            raise ConfigError(f"near_dup_threshold must be in [0, 64] (bits of 64), or -1 for off, "
                              f"got {self.near_dup_threshold}")
        if not 0.0 < self.clip_threshold <= 1.0:
            raise ConfigError(f"clip_threshold must be in (0, 1], got {self.clip_threshold}")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"caption_extension must start with '.', got {self.caption_extension!r}")
        try:
            parse_color(self.background)
        except ValueError as e:
            raise ConfigError(f"background: {e}") from None

    @property
    def effective_min_size(self) -> int:
        """min_size, or half the resolution when unset (below that an image needs > 2x upscaling)."""
        return self.min_size if self.min_size is not None else self.resolution // 2

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return parse_color(self.background)


def parse_color(value: str | Sequence[int]) -> tuple[int, int, int]:
    """An RGB triple from "white", "#rrggbb", "#rgb", "r,g,b" or a 3-sequence of 0-255 ints."""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+\s*,\s*\d+\s*,\s*\d+", text):
            value = [int(v) for v in text.split(",")]
        else:
            try:
                rgb = ImageColor.getrgb(text)
            except ValueError:
                raise ValueError(f"not a colour: {value!r} (use a name like 'white', '#rrggbb' or 'r,g,b')") from None
            return tuple(int(c) for c in rgb[:3])  # type: ignore[return-value]
    values = list(value)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values):
        raise ValueError(f"not an RGB colour: {value!r} (three integers 0-255)")
    return (int(values[0]), int(values[1]), int(values[2]))


def _color_text(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# =============================================================================================
# Report objects
# =============================================================================================

@dataclass
class FileRecord:
    """One source file and what became of it (one row of the manifest)."""

    source: str                               # path relative to the source folder / name inside the zip
    kind: str = "image"                       # image | caption | other
    status: str = "ok"                        # ok | rejected | skipped | dropped
    reason: str = ""
    file_bytes: int = 0
    sha256: str = ""                          # of the file's bytes
    original_size: tuple[int, int] | None = None   # (width, height) after EXIF rotation
    original_mode: str = ""
    original_format: str = ""
    prepared: str = ""                        # path relative to output_dir
    prepared_size: tuple[int, int] | None = None
    bucket: tuple[int, int] | None = None     # the training bucket of the prepared image
    repeats: int = 1                          # from a kohya "N_name" folder
    caption: str = ""
    caption_source: str = ""
    flags: list[str] = field(default_factory=list)
    pixel_sha256: str = ""                    # of the decoded RGB pixels (exact duplicates across formats)
    phash: str = ""                           # 64-bit perceptual hash, hex
    color_sig: str = ""                       # 4x4 RGB thumbnail, hex (near duplicates must match in colour too)

    @property
    def name(self) -> str:
        """How the user refers to this file: its prepared path when it has one, else its source path."""
        return self.prepared or self.source

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("original_size", "prepared_size", "bucket"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("original_size", "prepared_size", "bucket"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class DuplicateGroup:
    """Images that are the same (exact), look the same (near: perceptual hash) or mean the same (clip)."""

    kind: str                                 # exact | near | clip
    members: list[str]                        # prepared names; the suggested keeper first
    scores: dict[str, float] = field(default_factory=dict)  # member -> distance (near) / cosine (clip) to keeper
    sheet: Path | None = None                 # side-by-side thumbnails

    @property
    def keep(self) -> str:
        return self.members[0]

    @property
    def others(self) -> list[str]:
        return self.members[1:]


@dataclass
class PrepareReport:
    """What `prepare` did: prepared items, rejected and skipped files with reasons, duplicates, buckets, files."""

    config: PrepareConfig
    output_dir: Path
    items: list[FileRecord]                   # prepared images (status ok)
    rejected: list[FileRecord]                # bad input, each with its reason
    skipped: list[FileRecord]                 # files that are not images (or captions without an image)
    duplicate_groups: list[DuplicateGroup]
    bucket_table: list[tuple[tuple[int, int], int]]
    manifest_json: Path
    manifest_csv: Path
    contact_sheets: list[Path]
    bucket_plot: Path | None
    report_text: Path
    config_path: Path

    @property
    def smaller_than_target(self) -> list[FileRecord]:
        """Prepared images kept below the target size because upscaling is off."""
        return [r for r in self.items if "upscale_needed" in r.flags]

    def suggested_drops(self, kinds: Sequence[str] = ("exact", "near")) -> list[str]:
        """Every duplicate but the keeper of each group of these kinds (pass to `drop_images`)."""
        out: list[str] = []
        for g in self.duplicate_groups:
            if g.kind in kinds:
                out.extend(n for n in g.others if n not in out)
        return out

    def summary(self) -> str:
        """A few lines for a notebook: counts, every rejection with its reason, duplicates and buckets."""
        cfg = self.config
        n_total = len(self.items) + len(self.rejected) + len(self.skipped)
        lines = [f"Prepared {len(self.items)} images from {cfg.source} into {self.output_dir}",
                 f"  settings: crop={cfg.crop}, resolution={cfg.resolution}, format={cfg.image_format}, "
                 f"min_size={cfg.effective_min_size}, upscale={'on' if cfg.allow_upscale else 'off'}",
                 f"  files seen: {n_total}; ok {len(self.items)}, rejected {len(self.rejected)}, "
                 f"skipped {len(self.skipped)}"]
        if not self.items:
            lines.append("  WARNING: no usable images" + (": see the reasons below." if self.rejected or self.skipped
                                                          else ": the source holds no files."))
        upscaled = [r for r in self.items if "upscaled" in r.flags]
        if upscaled:
            lines.append(f"  upscaled ({len(upscaled)}, smaller than the target): "
                         + ", ".join(r.name for r in upscaled))
        small = self.smaller_than_target
        if small:
            lines.append(f"  smaller than target ({len(small)}, kept at their size; allow_upscale=True to upscale):")
            shown = [r for r in small if r.original_size][:10]
            lines += [f"    {r.name}: {r.original_size[0]}x{r.original_size[1]}" for r in shown]
            if len(small) > len(shown):
                lines.append(f"    ... and {len(small) - len(shown)} more (flag 'upscale_needed' in the manifest)")
        if self.rejected:
            lines.append(f"  rejected ({len(self.rejected)}):")
            lines += [f"    {r.source}: {r.reason}" for r in self.rejected]
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}):")
            lines += [f"    {r.source}: skipped: {r.reason}" for r in self.skipped]
        if self.duplicate_groups:
            lines.append(f"  duplicate groups ({len(self.duplicate_groups)}; nothing dropped, the first of each is "
                         f"the suggested keeper):")
            for g in self.duplicate_groups:
                scores = ", ".join(f"{n} ({g.scores[n]:g})" if n in g.scores else n for n in g.others)
                lines.append(f"    {g.kind}: keep {g.keep}; {scores}")
            lines.append(f"  to drop the suggested ones: "
                         f"drop_images({str(self.output_dir)!r}, report.suggested_drops())")
        if self.bucket_table:
            lines.append("  buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in self.bucket_table))
        lines.append(f"  manifest: {self.manifest_json}")
        if self.contact_sheets:
            lines.append(f"  contact sheet: {', '.join(str(p) for p in self.contact_sheets)}")
        return "\n".join(lines)


# =============================================================================================
# Reading the source: a folder or a zip, one entry per file
# =============================================================================================

@dataclass
class _Entry:
    rel: str                                  # posix path relative to the source root
    size: int
    read: Callable[[], bytes]
    problem: str | None = None                # set when the entry must be rejected unread


def _folder_entries(root: Path) -> tuple[list[_Entry], list[FileRecord]]:
    entries: list[_Entry] = []
    skipped: list[FileRecord] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for d in list(dirnames):
            why = ("link to a folder (not followed)" if (base / d).is_symlink() else
                   "macOS metadata folder (not read)" if d == "__MACOSX" else
                   "hidden folder (not read)" if d.startswith(".") else None)
            if why:
                rel = (base / d).relative_to(root).as_posix() + "/"
                skipped.append(FileRecord(source=rel, kind="other", status="skipped", reason=why))
                dirnames.remove(d)
        dirnames.sort()
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(root).as_posix()
            try:
                size = path.stat().st_size
            except OSError as e:  # a dangling link, a permission problem
                entries.append(_Entry(rel, 0, lambda: b"", problem=f"cannot read the file: {e.strerror or e}"))
                continue
            entries.append(_Entry(rel, size, (lambda p=path: p.read_bytes())))
    return entries, skipped


def _unsafe_member(name: str) -> bool:
    """True for zip members that would land outside the extraction folder (zip-slip) or name a drive."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in re.split(r"[\\/]", name))


@contextmanager
def _zip_entries(path: Path) -> Iterator[list[_Entry]]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a valid zip file ({e}). Re-create the zip or pass the folder "
                         f"instead.") from None
    with zf:
        entries: list[_Entry] = []
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            problem = None
            if _unsafe_member(name):
                problem = "unsafe path in zip (absolute or '..': zip-slip); not extracted"
            elif (info.external_attr >> 16) & 0o170000 == 0o120000:
                problem = "symbolic link inside the zip; not extracted"
            elif info.flag_bits & 0x1:
                problem = "encrypted (password-protected) zip member; unzip it yourself and pass the folder"
            elif info.file_size > MAX_FILE_BYTES:
                problem = f"file too large ({info.file_size:,} bytes uncompressed; limit {MAX_FILE_BYTES:,})"

            def read(info: zipfile.ZipInfo = info) -> bytes:
                try:
                    with zf.open(info) as f:
                        data = f.read(MAX_FILE_BYTES + 1)
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError, zlib.error) as e:
                    raise RejectedInput(f"cannot extract this member from the zip ({type(e).__name__}: {e})") from None
                if len(data) > MAX_FILE_BYTES:
                    raise RejectedInput(f"file too large (over {MAX_FILE_BYTES:,} bytes)")
                return data

            rel = name.replace("\\", "/") if problem is None else name
            entries.append(_Entry(rel, info.file_size, read, problem))
        entries.sort(key=lambda e: e.rel)
        yield entries


class RejectedInput(ValueError):
    """A source file cannot be used; the message is the reason shown to the user."""


# =============================================================================================
# Decoding: any supported file -> RGB, with flags saying what was done
# =============================================================================================

_HEIF_STATE: dict[str, bool] = {}


def heic_supported() -> bool:
    """True when pillow-heif is installed (its opener is registered with PIL on first call)."""
    if "ok" not in _HEIF_STATE:
        try:
            import pillow_heif  # type: ignore[import-not-found]

            pillow_heif.register_heif_opener()
            _HEIF_STATE["ok"] = True
        except Exception:
            _HEIF_STATE["ok"] = False
    return _HEIF_STATE["ok"]


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb limit set to `max_pixels`, its warning turned into an error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


_FORMATS_BY_EXT = {".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".jpe": {"JPEG"}, ".jfif": {"JPEG"},
                   ".png": {"PNG"}, ".webp": {"WEBP"}, ".bmp": {"BMP", "DIB"}, ".tif": {"TIFF"},
                   ".tiff": {"TIFF"}, ".gif": {"GIF"}, ".avif": {"AVIF"}, ".heic": {"HEIF"}, ".heif": {"HEIF"}}


def _unidentified_reason(data: bytes) -> str:
    head = data[:512]
    if head.startswith(b"%PDF"):
        return "not an image: the file is a PDF with an image extension"
    if head.startswith(b"PK\x03\x04"):
        return "not an image: the file is a zip archive with an image extension"
    if head.startswith((b"<!DOCTYPE", b"<html", b"<HTML")):
        return "not an image: the file is a web page with an image extension (a failed download?)"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return "not an image: the file holds text, not image data"
    except UnicodeDecodeError:
        pass
    return "not a readable image: unknown format or corrupt header"


@dataclass
class _Decoded:
    image: Image.Image                        # RGB
    size: tuple[int, int]                     # after EXIF rotation
    mode: str
    format: str
    flags: list[str]


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float greyscale -> 8-bit "L" by range, not by clipping."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        scale = 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else (255.0 / 65535.0 if np.nanmax(a) > 255 else 1.0)
        a = np.nan_to_num(a) * scale
    else:
        a = a.astype(np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _to_srgb(im: Image.Image, icc: bytes, flags: list[str]) -> Image.Image:
    """Convert an RGB or CMYK image with an embedded ICC profile to sRGB; unchanged if the profile is unusable."""
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if im.mode == "RGB" and "srgb" in (ImageCms.getProfileDescription(src) or "").lower().replace(" ", ""):
            return im  # already sRGB
        out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        if out is None:
            return im
        flags.append("icc_converted")
        return out
    except Exception:  # a broken or exotic profile must not lose the image
        flags.append("icc_ignored")
        return im


def decode_image(data: bytes, *, max_pixels: int = 100_000_000,
                 background: tuple[int, int, int] = (255, 255, 255), ext: str = "") -> _Decoded:
    """Decode file bytes to an RGB image the way training wants it, or raise `RejectedInput` with the reason.

    EXIF orientation applied; first frame of animations; CMYK (via its ICC profile when present),
    palette, greyscale and 16-bit converted; transparency flattened on `background`.
    """
    if not data:
        raise RejectedInput("empty file (0 bytes)")
    if ext.lower() in HEIC_EXTENSIONS and not heic_supported():
        raise RejectedInput(HEIC_MISSING)
    flags: list[str] = []
    try:
        with _pixel_limit(max_pixels):
            im = Image.open(io.BytesIO(data))
            fmt, mode, (w, h) = im.format or "", im.mode, im.size
            if w * h > max_pixels:
                raise RejectedInput(f"decompression bomb: declares {w}x{h} = {w * h:,} pixels, over "
                                    f"max_pixels={max_pixels:,} (raise max_pixels if this is a real photo)")
            if getattr(im, "is_animated", False):
                flags.append("animated")
                im.seek(0)
            im.load()
    except RejectedInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(m.group(1)):,} pixels" if m else "a huge size"
        raise RejectedInput(f"decompression bomb: declares {declared}, over max_pixels={max_pixels:,} "
                            f"(raise max_pixels if this is a real photo)") from None
    except UnidentifiedImageError:
        raise RejectedInput(_unidentified_reason(data)) from None
    except MemoryError:
        raise RejectedInput("too large to decode in memory") from None
    except Exception as e:  # OSError (truncated), SyntaxError, ValueError, EOFError, struct.error from plugins
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise RejectedInput(f"truncated or incomplete file ({msg}); re-copy or re-export it") from None
        raise RejectedInput(f"corrupt image ({type(e).__name__}: {msg})") from None

    if ext and fmt and fmt not in _FORMATS_BY_EXT.get(ext.lower(), {fmt}):
        flags.append(f"extension_mismatch:{fmt.lower()}")
    icc = im.info.get("icc_profile")
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:
        orientation = 1
    if orientation in range(2, 9):
        try:
            im = ImageOps.exif_transpose(im)
            flags.append("exif_rotated")
        except Exception:
            flags.append("exif_unreadable")

    try:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            flags.append("16bit" if im.mode != "F" else "float")
            im = _to_8bit(im)
        if im.mode == "CMYK":
            flags.append("cmyk")
            im = _to_srgb(im, icc, flags) if icc else im.convert("RGB")
            icc = None
        elif im.mode == "LAB":  # PIL's convert() has no LAB -> RGB; littleCMS does
            from PIL import ImageCms

            flags.append("lab")
            im = ImageCms.profileToProfile(im, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                           outputMode="RGB")
            icc = None
        if im.mode in ("P", "PA"):
            flags.append("palette")
        elif im.mode in ("1", "L", "LA", "La"):
            flags.append("greyscale")
        has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
        if has_alpha:
            rgba = im.convert("RGBA")
            if rgba.getchannel("A").getextrema()[0] < 255:
                flags.append("had_alpha")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            im = Image.alpha_composite(canvas, rgba).convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        if icc and im.mode == "RGB":
            im = _to_srgb(im, icc, flags)
    except RejectedInput:
        raise
    except Exception as e:
        raise RejectedInput(f"unsupported colour mode {mode} ({type(e).__name__}: {e})") from None
    im.info.clear()  # no EXIF (GPS!), ICC or text chunks travel into the prepared copy
    return _Decoded(image=im, size=im.size, mode=mode, format=fmt, flags=flags)


def read_caption(data: bytes) -> tuple[str, str | None]:
    """Caption text from file bytes and a note when it was not UTF-8 (`dataset.decode_caption`); raise
    `RejectedInput` when the file holds no text."""
    try:
        return decode_caption(data)
    except CaptionDecodeError as e:
        raise RejectedInput(f"{e}; the image is kept without a caption") from None


# =============================================================================================
# Hashes and duplicates
# =============================================================================================

def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: 8x8 lowest frequencies of the 2-D DCT of a 32x32 greyscale thumbnail, above their median."""
    factor = min(image.size) // 128
    small = image.reduce(factor) if factor > 1 else image  # a fast box pre-shrink of big photos
    a = np.asarray(small.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ a @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def color_signature(image: Image.Image) -> bytes:
    """A 4x4 RGB thumbnail (48 bytes): the pHash sees only luminance structure, this adds colour."""
    return image.convert("RGB").resize((4, 4), Image.Resampling.BOX, reducing_gap=2.0).tobytes()


#: Mean absolute difference (0-255) of colour signatures up to which a pHash match counts as near duplicate.
NEAR_DUP_MAX_COLOR_DIFF = 20.0


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return int(a ^ b).bit_count()


def _pixel_sha256(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.width}x{image.height}:{image.mode}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _union_groups(n: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _keeper_order(records: Sequence[FileRecord], idx: Sequence[int]) -> list[int]:
    """Indices sorted biggest original first (pixels, then file size), then by name: the first is the keeper."""
    def key(i: int) -> tuple:
        r = records[i]
        return (-(r.original_size[0] * r.original_size[1]) if r.original_size else 0, -r.file_bytes, r.name)
    return sorted(idx, key=key)


def find_duplicates(records: list[FileRecord], near_threshold: int | None = 10,
                    embeddings: np.ndarray | None = None, clip_threshold: float = 0.95) -> list[DuplicateGroup]:
    """Group prepared records: exact (same decoded pixels), near (pHash within `near_threshold` bits and
    colour signatures within NEAR_DUP_MAX_COLOR_DIFF: the same picture resized or recompressed; a
    greyscale copy of a colour photo is not near; None or -1 turns it off) and, given L2-normalised
    `embeddings` (one row per record), clip (cosine >= `clip_threshold`).

    Near and clip groups are formed between one representative per exact group; pairs already in a
    near group are not repeated as clip pairs. Each non-keeper member gets a flag naming its keeper.
    """
    groups: list[DuplicateGroup] = []
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_pixels[r.pixel_sha256 or f"unique:{i}"].append(i)
    reps: list[int] = []
    for idx in by_pixels.values():
        ordered = _keeper_order(records, idx)
        reps.append(ordered[0])
        if len(ordered) > 1:
            keeper = records[ordered[0]]
            groups.append(DuplicateGroup("exact", [records[i].name for i in ordered],
                                         {records[i].name: 0.0 for i in ordered[1:]}))
            for i in ordered[1:]:
                records[i].flags.append(f"duplicate_of:{keeper.name}")
                if records[i].sha256 != keeper.sha256:
                    records[i].flags.append("same_pixels_different_file")
    reps.sort()
    pos = {i: k for k, i in enumerate(reps)}

    def add_groups(kind: str, matrix: np.ndarray, pairs: list[tuple[int, int]], flag: str, digits: int) -> None:
        for comp in _union_groups(len(reps), pairs):
            ordered = _keeper_order(records, [reps[k] for k in comp])
            keeper = records[ordered[0]]
            scores = {records[i].name: round(float(matrix[pos[ordered[0]], pos[i]]), digits) for i in ordered[1:]}
            groups.append(DuplicateGroup(kind, [records[i].name for i in ordered], scores))
            for i in ordered[1:]:
                records[i].flags.append(f"{flag}:{keeper.name}")

    near_pairs: set[tuple[int, int]] = set()
    if near_threshold is not None and near_threshold >= 0 and len(reps) > 1:
        hashes = np.array([int(records[i].phash, 16) for i in reps], dtype=np.uint64)
        dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :]).astype(np.int64)
        close = dist <= near_threshold
        if all(records[i].color_sig for i in reps):
            sigs = np.array([np.frombuffer(bytes.fromhex(records[i].color_sig), np.uint8) for i in reps], np.float64)
            close &= np.abs(sigs[:, None, :] - sigs[None, :, :]).mean(-1) <= NEAR_DUP_MAX_COLOR_DIFF
        ii, jj = np.nonzero(np.triu(close, k=1))
        pairs = list(zip(ii.tolist(), jj.tolist()))
        add_groups("near", dist, pairs, "near_duplicate_of", 0)
        for comp in _union_groups(len(reps), pairs):
            near_pairs.update((a, b) for a in comp for b in comp if a < b)

    if embeddings is not None and len(reps) > 1:
        e = np.asarray(embeddings, dtype=np.float64)[reps]
        sim = e @ e.T
        ii, jj = np.nonzero(np.triu(sim >= clip_threshold, k=1))
        pairs = [(a, b) for a, b in zip(ii.tolist(), jj.tolist()) if (a, b) not in near_pairs]
        add_groups("clip", sim, pairs, "clip_similar_to", 4)
    return groups


# ---- CLIP embeddings ---------------------------------------------------------------------------

def load_clip(model: str, device: str | None = None) -> tuple[Any, Any]:
    """(CLIPModel, CLIPImageProcessor) from a hub id or a local folder, in eval mode on `device` (auto)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    try:
        processor = CLIPImageProcessor.from_pretrained(model)
        clip = CLIPModel.from_pretrained(model)
    except OSError as e:
        raise OSError(f"Could not load the CLIP model {model!r}: {e}. Give a hub id such as "
                      f"'openai/clip-vit-base-patch32' (needs network or a cached copy) or a local folder "
                      f"holding config.json, the weights and preprocessor_config.json.") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip = clip.to(device).eval()
    if device.startswith("cuda"):
        clip = clip.half()
    return clip, processor


def clip_embeddings(images: Sequence[Image.Image], model: Any, processor: Any, batch_size: int = 16) -> np.ndarray:
    """L2-normalised CLIP image embeddings, one row per image (float32)."""
    import torch

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rows = []
    for start in range(0, len(images), batch_size):
        batch = processor(images=list(images[start:start + batch_size]), return_tensors="pt")
        with torch.inference_mode():
            out = model.get_image_features(pixel_values=batch["pixel_values"].to(device, dtype))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        rows.append(feats.cpu().numpy())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32)


# =============================================================================================
# Crops
# =============================================================================================

def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window with reflected borders."""
    if r <= 0:
        return a
    p = np.pad(a, r, mode="reflect")
    c = np.cumsum(np.cumsum(p, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def saliency_map(image: Image.Image, size: int = 128) -> np.ndarray:
    """Where the subject probably is: mean of spectral residual saliency (Hou & Zhang 2007) and local
    contrast (local standard deviation of luminance), each scaled to [0, 1]; long side `size` pixels."""
    scale = size / max(image.size)
    w, h = max(8, round(image.width * scale)), max(8, round(image.height * scale))
    a = np.asarray(image.convert("L").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0

    # Spectral residual of the image less its best-fit plane (brightness and a smooth gradient such as a
    # sky are not salient), mirror-padded so the wrap-around of the FFT adds no border edges.
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], axis=1)
    coef, *_ = np.linalg.lstsq(design, a.ravel(), rcond=None)
    pad = max(h, w) // 4
    p = np.pad(a - (design @ coef).reshape(h, w), pad, mode="reflect")
    spectrum = np.fft.fft2(p)
    log_amp = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amp - _box_blur(log_amp, 1)
    sr = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sr = _box_blur(_box_blur(sr, 2), 2)[pad:pad + h, pad:pad + w]

    mean = _box_blur(a, 2)
    contrast = np.sqrt(np.maximum(_box_blur(a * a, 2) - mean * mean, 0.0))
    contrast = _box_blur(contrast, 2)

    def norm(x: np.ndarray) -> np.ndarray:
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(x)

    return 0.5 * norm(sr) + 0.5 * norm(contrast)


def _best_offset(profile: np.ndarray, length: int, window: int) -> int:
    """Offset in [0, length - window] of the window that holds the most of `profile` (sampled along
    `length` pixels). The window's edges count less (Tukey taper), so the subject lands inside, not on
    the edge. The centre wins unless the best window beats it by 10% (no clear subject), and among
    windows within 2% of the best the one nearest the centre is taken."""
    free = length - window
    if free <= 0:
        return 0
    xs = (np.arange(length) + 0.5) * len(profile) / length - 0.5
    values = np.interp(xs, np.arange(len(profile)), profile)
    t = (np.arange(window) + 0.5) / window
    taper = np.ones(window)
    edge = 0.25  # the outer quarter of each side tapers to zero
    lo, hi = t < edge, t > 1 - edge
    taper[lo] = 0.5 * (1 - np.cos(np.pi * t[lo] / edge))
    taper[hi] = 0.5 * (1 - np.cos(np.pi * (1 - t[hi]) / edge))
    scores = np.correlate(values, taper, mode="valid")  # len free + 1
    best = float(scores.max())
    centre = free // 2
    if best <= 1.1 * float(scores[centre]):
        return centre
    candidates = np.nonzero(scores >= 0.98 * best)[0]
    return int(candidates[np.argmin(np.abs(candidates - free / 2))])


def subject_crop(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Scale `image` to cover (width, height), then crop there with the window placed on the most salient
    part (see `saliency_map`) rather than the centre; returns (image, (crop_top, crop_left))."""
    tw, th = int(size[0]), int(size[1])
    scale = max(tw / image.width, th / image.height)
    rw, rh = max(tw, int(image.width * scale + 0.5)), max(th, int(image.height * scale + 0.5))
    sal = saliency_map(image)
    left = _best_offset(sal.sum(axis=0), rw, tw)
    top = _best_offset(sal.sum(axis=1), rh, th)
    if (rw, rh) != image.size:
        image = image.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (rw, rh) != (tw, th):
        image = image.crop((left, top, left + tw, top + th))
    return image, (top, left)


def _floor_step(x: int, step: int = _STEP) -> int:
    return max(step, x - x % step) if x >= step else max(8, x - x % 8)


def _shrink_to_fit(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    s = max_side / max(image.size)
    size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def crop_image(image: Image.Image, cfg: PrepareConfig,
               buckets: Sequence[tuple[int, int]]) -> tuple[Image.Image, list[str]]:
    """The prepared image for crop mode `cfg.crop`, and flags saying what was done.

    "upscale_needed": smaller than the target, kept at its own size (step-rounded); "upscaled": the
    same, scaled up because `allow_upscale`; plus "cropped", "resized", "padded".
    none: unchanged (long side capped at `max_side`); bucket: sd-scripts bucket (resize + centre crop);
    center / subject: resolution-sided square, centred or placed on the subject; pad: letterboxed square.
    """
    w, h = image.size
    res = cfg.resolution
    flags: list[str] = []
    small = False
    if cfg.crop == "none":
        out = _shrink_to_fit(image, cfg.max_side) if cfg.max_side else image
        bucket = select_bucket(out.width, out.height, buckets, res)
        small = bucket[0] > out.width or bucket[1] > out.height
        if small:
            flags.append("upscale_needed")  # "none" never scales up
        small = False
    elif cfg.crop == "bucket":
        bucket = select_bucket(w, h, buckets, res)
        small = bucket[0] > w or bucket[1] > h
        if small and not cfg.allow_upscale:
            bucket = select_bucket(w, h, [], res, no_upscale=True, step=cfg.bucket_reso_steps)
        out, _ = resize_and_crop(image, bucket, "center")
    elif cfg.crop in ("center", "subject"):
        side = res
        small = min(w, h) < res
        if small and not cfg.allow_upscale:
            side = _floor_step(min(w, h), cfg.bucket_reso_steps)
        out = (resize_and_crop(image, (side, side), "center")[0] if cfg.crop == "center"
               else subject_crop(image, (side, side))[0])
    else:  # pad
        side = res
        small = max(w, h) < res
        if small and not cfg.allow_upscale:
            side = min(res, -(-max(w, h) // 8) * 8)
        s = side / max(w, h)
        inner = (max(1, round(w * s)), max(1, round(h * s)))
        scaled = image if inner == image.size else image.resize(inner, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = Image.new("RGB", (side, side), cfg.background_rgb)
        out.paste(scaled, ((side - inner[0]) // 2, (side - inner[1]) // 2))
        if inner != (side, side):
            flags.append("padded")
        if inner != image.size:
            flags.append("resized")
    if small:
        flags.append("upscaled" if cfg.allow_upscale else "upscale_needed")
    if cfg.crop != "pad":
        if abs(out.width / out.height - w / h) > 0.01 * (w / h):
            flags.append("cropped")
        if abs(max(out.width / w, out.height / h) - 1.0) > 1e-9:
            flags.append("resized")
    return out, flags


# =============================================================================================
# Sheets and plots
# =============================================================================================

def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def thumbnail_sheet(thumbs: Sequence[tuple[Image.Image, Sequence[str]]], columns: int = 10, cell: int = 160,
                    title: str = "") -> Image.Image:
    """A grid of thumbnails, each with its lines of text underneath (file name first)."""
    font = _font(12)
    n_lines = max((len(lines) for _, lines in thumbs), default=1)
    line_h = 15
    cols = max(1, min(columns, len(thumbs)))
    rows = max(1, math.ceil(len(thumbs) / cols))
    pad = 6
    title_h = 24 if title else 0
    cw, ch = cell + 2 * pad, cell + 2 * pad + n_lines * line_h
    sheet = Image.new("RGB", (cols * cw, title_h + rows * ch), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, 5), title, fill=(0, 0, 0), font=_font(14))
    for k, (img, lines) in enumerate(thumbs):
        x0, y0 = (k % cols) * cw, title_h + (k // cols) * ch
        t = img.copy()
        t.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        sheet.paste(t, (x0 + pad + (cell - t.width) // 2, y0 + pad + (cell - t.height) // 2))
        for j, line in enumerate(lines):
            draw.text((x0 + pad, y0 + pad + cell + 2 + j * line_h), _fit_text(draw, line, font, cell),
                      fill=(0, 0, 0) if j == 0 else (90, 90, 90), font=font)
    return sheet


def _save_png(image: Image.Image, path: Path, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        image.save(tmp, format="PNG")
    return path


def plot_buckets(table: Sequence[tuple[tuple[int, int], int]], path: str | Path, resolution: int,
                 fsync: bool = True) -> Path:
    """Bar chart of images per bucket as a PNG (matplotlib's Agg canvas: no pyplot, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{w}x{h}" for (w, h), _ in table] or ["(none)"]
    counts = [n for _, n in table] or [0]
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(max(5.0, 0.55 * len(labels) + 1.5), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(labels)), counts, color="#4c72b0")
    ax.bar_label(bars, fontsize=8)
    ax.margins(y=0.12)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("bucket (width x height)", fontsize=9)
    ax.set_ylabel("images")
    ax.set_title(f"images per bucket, resolution {resolution} ({sum(counts)} images)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        fig.savefig(tmp, format="png")
    return path


def compute_bucket_table(records: Sequence[FileRecord]) -> list[tuple[tuple[int, int], int]]:
    """(bucket, number of images) over records with status ok, sorted by bucket."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for r in records:
        if r.status == "ok" and r.bucket is not None:
            counts[(int(r.bucket[0]), int(r.bucket[1]))] += 1
    return sorted(counts.items())


def _contact_sheets(folder: Path, items: Sequence[FileRecord], thumbs: dict[str, Image.Image], report_dir: Path,
                    fsync: bool, per_page: int = 100) -> list[Path]:
    for old in report_dir.glob("contact_sheet_*.png"):
        old.unlink()
    paths = []
    pages = max(1, math.ceil(len(items) / per_page)) if items else 0
    for p in range(pages):
        chunk = items[p * per_page:(p + 1) * per_page]
        cells = []
        for r in chunk:
            img = thumbs.get(r.name)
            if img is None:
                img = _thumb_from_file(folder / r.prepared)
            size = f"{r.prepared_size[0]}x{r.prepared_size[1]}" if r.prepared_size else ""
            cells.append((img, [r.name, size]))
        title = f"prepared set: {len(items)} images" + (f" (page {p + 1} of {pages})" if pages > 1 else "")
        sheet_path = report_dir / f"contact_sheet_{p + 1:02d}.png"
        paths.append(_save_png(thumbnail_sheet(cells, title=title), sheet_path, fsync))
    return paths


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _thumb_from_file(path: Path, cell: int = 160) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.thumbnail((cell, cell))
            return im.convert("RGB")
    except Exception:
        return Image.new("RGB", (cell, cell), (200, 0, 0))


def _duplicate_sheets(groups: Sequence[DuplicateGroup], by_name: dict[str, FileRecord], thumbs: dict[str, Image.Image],
                      folder: Path, report_dir: Path, final_report_dir: Path, fsync: bool) -> None:
    dup_dir = report_dir / "duplicates"
    for k, g in enumerate(groups, start=1):
        cells = []
        for j, name in enumerate(g.members[:12]):
            r = by_name[name]
            img = thumbs.get(name) or _thumb_from_file(folder / r.prepared)
            size = f"{r.original_size[0]}x{r.original_size[1]}, {r.file_bytes / 1e6:.2f} MB" if r.original_size else ""
            if j == 0:
                score = "keep (suggested)"
            elif g.kind == "near":
                score = f"distance {g.scores[name]:g} bits"
            elif g.kind == "clip":
                score = f"cosine {g.scores[name]:.4f}"
            else:
                score = "identical pixels"
            cells.append((img, [name, size, score]))
        more = f" (+{len(g.members) - 12} more)" if len(g.members) > 12 else ""
        sheet = thumbnail_sheet(cells, columns=len(cells), cell=200, title=f"{g.kind} duplicates, group {k}{more}")
        fname = f"{k:03d}_{g.kind}.png"
        _save_png(sheet, dup_dir / fname, fsync)
        g.sheet = final_report_dir / "duplicates" / fname


# =============================================================================================
# Manifest
# =============================================================================================

_CSV_COLUMNS = ("source", "kind", "status", "reason", "prepared", "width", "height", "bucket", "original_width",
                "original_height", "original_mode", "original_format", "file_bytes", "sha256", "repeats",
                "caption", "caption_source", "flags", "phash")


def _csv_text(records: Sequence[FileRecord]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for r in records:
        writer.writerow([r.source, r.kind, r.status, r.reason, r.prepared,
                         r.prepared_size[0] if r.prepared_size else "", r.prepared_size[1] if r.prepared_size else "",
                         f"{r.bucket[0]}x{r.bucket[1]}" if r.bucket else "",
                         r.original_size[0] if r.original_size else "", r.original_size[1] if r.original_size else "",
                         r.original_mode, r.original_format, r.file_bytes, r.sha256, r.repeats, r.caption,
                         r.caption_source, ";".join(r.flags), r.phash])
    return buf.getvalue()


def _write_manifest(folder: Path, cfg: PrepareConfig, records: Sequence[FileRecord], groups: Sequence[DuplicateGroup],
                    source_kind: str, created: str, fsync: bool = True) -> None:
    data = {
        "format": MANIFEST_FORMAT,
        "created": created,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": cfg.source,
        "source_kind": source_kind,
        "config": dataclasses.asdict(cfg),
        "bucket_table": [[f"{w}x{h}", n] for (w, h), n in compute_bucket_table(records)],
        "duplicate_groups": [{"kind": g.kind, "members": g.members, "scores": g.scores} for g in groups],
        "files": [r.to_dict() for r in records],
    }
    with atomic_path(folder / MANIFEST_JSON, fsync=fsync) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    with atomic_path(folder / MANIFEST_CSV, fsync=fsync) as tmp:
        tmp.write_text(_csv_text(records), encoding="utf-8")


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared set as a dict ("files" holds one dict per source file)."""
    path = Path(prepared_dir) / MANIFEST_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{prepared_dir} is not a prepared set (no {MANIFEST_JSON}); run prepare() first.")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a manifest this version reads (format {data.get('format')!r})")
    return data


def _is_prepared_set(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST_JSON).read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
    except Exception:
        return False


# =============================================================================================
# prepare
# =============================================================================================

def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_paths(source: Path, output: Path, overwrite: bool) -> str:
    if not source.exists():
        raise FileNotFoundError(f"Source not found: {source}")
    if source.is_dir():
        kind = "folder"
    elif source.is_file() and source.suffix.lower() == ".zip":
        kind = "zip"
    else:
        raise ValueError(f"Source must be a folder of images or a .zip file, got {source}")
    src, out = source.resolve(), output.resolve()
    if kind == "folder" and (out == src or _is_within(out, src)):
        raise ValueError(f"output_dir {output} is inside the source folder {source}: the prepared copy would mix "
                         f"with the originals. Choose a folder outside it, e.g. "
                         f"{src.parent / (src.name + '_prepared')}")
    if _is_within(src, out):
        raise ValueError(f"The source {source} is inside output_dir {output}; replacing the output would delete "
                         f"it. Choose another output_dir.")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"output_dir {output} is a file; choose a folder.")
        if any(out.iterdir()):
            if not _is_prepared_set(out):
                raise ValueError(f"output_dir {output} is not empty and holds no prepared set; refusing to replace "
                                 f"it. Choose a new or empty folder.")
            if not overwrite:
                raise FileExistsError(f"output_dir {output} already holds a prepared set. Pass overwrite=True to "
                                      f"replace it (its _dropped images go too), or choose another folder.")
    return kind


def _out_names(rels: Sequence[str]) -> dict[str, tuple[str, str, int]]:
    """Source rel path -> (output folder, output stem, repeats). A kohya "N_name" folder (the first at any
    depth) is kept; other folders are flattened into the stem ("sub__name"), after stripping the folders
    that hold every image (a zip's wrapper folder)."""
    def kohya_index(dirs: Sequence[str]) -> int | None:
        for k, d in enumerate(dirs):
            m = _KOHYA_FOLDER.match(d)
            if m and int(m.group(1)) >= 1:
                return k
        return None

    # Folders every image sits in (a zip's wrapper folder), counting a kohya folder's parents only.
    prefixes = []
    for r in rels:
        dirs = PurePosixPath(r).parts[:-1]
        k = kohya_index(dirs)
        prefixes.append(dirs if k is None else dirs[:k])
    common = 0
    if prefixes:
        first = prefixes[0]
        while common < len(first) and all(len(p) > common and p[common] == first[common] for p in prefixes):
            common += 1
    out: dict[str, tuple[str, str, int]] = {}
    for r in rels:
        parts = PurePosixPath(r).parts
        dirs, stem = parts[:-1], PurePosixPath(r).stem
        k = kohya_index(dirs)
        if k is None:
            folder, extra, repeats = "", dirs[common:], 1
        else:
            match = _KOHYA_FOLDER.match(dirs[k])
            assert match is not None
            folder, extra, repeats = dirs[k], dirs[k + 1:], int(match.group(1))
        name = "__".join([*extra, stem])
        out[r] = (_safe_name(folder), _safe_name(name) or "image", repeats)
    # Same folder and stem (a.jpg and a.png, or a.png in two flattened places): add the extension.
    by_key: dict[str, list[str]] = defaultdict(list)
    for r, (folder, stem, _) in out.items():
        by_key[f"{folder}/{stem}".lower()].append(r)
    for rs in by_key.values():
        if len(rs) > 1:
            for r in rs:
                folder, stem, repeats = out[r]
                ext = PurePosixPath(r).suffix.lstrip(".").lower()
                out[r] = (folder, f"{stem}_{ext}" if ext else stem, repeats)
    return out


def _safe_name(name: str) -> str:
    return re.sub(r'[<>:"|?*\\/\x00-\x1f]', "_", name).strip().rstrip(".")


def prepare(source: str | Path, output_dir: str | Path, *, resolution: int = 512, crop: str = "bucket",
            min_size: int | None = None, max_pixels: int = 100_000_000, max_side: int | None = None,
            allow_upscale: bool = False, background: str | Sequence[int] = (255, 255, 255),
            caption_extension: str = ".txt", image_format: str = "png", jpeg_quality: int = 95,
            near_dup_threshold: int | None = 10, clip_model: str | None = None, clip_threshold: float = 0.95,
            min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_reso_steps: int = 64,
            overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Turn a folder or .zip of photos into a clean prepared copy in `output_dir`, with a manifest and a report.

    See `PrepareConfig` for the settings. The source is never modified; `output_dir` must lie outside
    it, and an existing prepared set there is replaced (atomically) only with `overwrite=True`.
    """
    bg = background if isinstance(background, str) else _color_text(parse_color(background))
    cfg = PrepareConfig(source=str(source), output_dir=str(output_dir), resolution=resolution, crop=crop,
                        min_size=min_size, max_pixels=max_pixels, max_side=max_side, allow_upscale=allow_upscale,
                        background=bg, caption_extension=caption_extension, image_format=image_format,
                        jpeg_quality=jpeg_quality,
                        near_dup_threshold=-1 if near_dup_threshold is None else near_dup_threshold,
                        clip_model=clip_model,
                        clip_threshold=clip_threshold, min_bucket_reso=min_bucket_reso,
                        max_bucket_reso=max_bucket_reso, bucket_reso_steps=bucket_reso_steps)
    return prepare_from_config(cfg, overwrite=overwrite, progress=progress)


def prepare_from_config(cfg: PrepareConfig, *, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """`prepare` for a ready-made `PrepareConfig` (what the CLI and widgets build)."""
    from tqdm.auto import tqdm

    if not cfg.source:
        raise ConfigError("source must name a folder or a .zip file")
    if not cfg.output_dir:
        raise ConfigError("output_dir must name the folder for the prepared copy")
    source, output = Path(cfg.source).expanduser(), Path(cfg.output_dir).expanduser()
    source_kind = _check_paths(source, output, overwrite)
    clip = load_clip(cfg.clip_model) if cfg.clip_model else None  # fail before the long loop, not after it
    buckets = make_buckets(cfg.resolution, cfg.min_bucket_reso - cfg.min_bucket_reso % cfg.bucket_reso_steps,
                           cfg.max_bucket_reso + (-cfg.max_bucket_reso) % cfg.bucket_reso_steps, cfg.bucket_reso_steps)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ext_out = ".png" if cfg.image_format == "png" else ".jpg"
    cap_ext = cfg.caption_extension.lower()

    @contextmanager
    def entries_cm() -> Iterator[tuple[list[_Entry], list[FileRecord]]]:
        if source_kind == "zip":
            with _zip_entries(source) as entries:
                yield entries, []
        else:
            yield _folder_entries(source)

    with entries_cm() as (entries, skipped), atomic_dir(output) as tmp:
        records: list[FileRecord] = list(skipped)
        images: list[_Entry] = []
        captions: dict[tuple[str, str], _Entry] = {}
        others: list[_Entry] = []
        for e in entries:
            p = PurePosixPath(e.rel)
            parts = p.parts
            if e.problem:
                records.append(FileRecord(source=e.rel, kind="other", status="rejected", reason=e.problem,
                                          file_bytes=e.size))
            elif "__MACOSX" in parts or p.name.startswith("._"):
                records.append(FileRecord(source=e.rel, kind="other", status="skipped",
                                          reason=f"{NOT_AN_IMAGE} (macOS metadata)", file_bytes=e.size))
            elif any(part.startswith(".") for part in parts[:-1]):
                records.append(FileRecord(source=e.rel, kind="other", status="skipped",
                                          reason="inside a hidden folder", file_bytes=e.size))
            elif p.name.startswith(".") and p.suffix.lower() in INGEST_EXTENSIONS:
                records.append(FileRecord(source=e.rel, kind="other", status="skipped",
                                          reason="hidden file (name starts with '.')", file_bytes=e.size))
            elif p.suffix.lower() in INGEST_EXTENSIONS:
                images.append(e)
            elif cap_ext and p.suffix.lower() == cap_ext:
                captions[(str(p.parent), p.stem)] = e
            else:
                others.append(e)
        for e in others:
            records.append(FileRecord(source=e.rel, kind="other", status="skipped", reason=NOT_AN_IMAGE,
                                      file_bytes=e.size))

        names = _out_names([e.rel for e in images])
        used: set[str] = set()
        used_captions: dict[str, str] = {}   # caption rel -> what happened ("ok" or a reason)
        thumbs: dict[str, Image.Image] = {}
        ok: list[FileRecord] = []
        bg = cfg.background_rgb
        min_size = cfg.effective_min_size
        bar = tqdm(total=len(images), desc="preparing images", unit="img", disable=not progress)
        try:
            for e in images:
                p = PurePosixPath(e.rel)
                rec = FileRecord(source=e.rel, kind="image", file_bytes=e.size)
                records.append(rec)
                cap = captions.get((str(p.parent), p.stem))
                try:
                    if e.size > MAX_FILE_BYTES:
                        raise RejectedInput(f"file too large ({e.size:,} bytes; limit {MAX_FILE_BYTES:,})")
                    data = e.read()
                    rec.file_bytes = len(data)
                    rec.sha256 = hashlib.sha256(data).hexdigest()
                    dec = decode_image(data, max_pixels=cfg.max_pixels, background=bg, ext=p.suffix)
                    rec.original_size, rec.original_mode, rec.original_format = dec.size, dec.mode, dec.format
                    rec.flags = list(dec.flags)
                    if min(dec.size) < min_size:
                        raise RejectedInput(f"too small: {dec.size[0]}x{dec.size[1]} (short side "
                                            f"{min(dec.size)} < min_size {min_size})")
                    out_img, crop_flags = crop_image(dec.image, cfg, buckets)
                except RejectedInput as err:
                    rec.status, rec.reason = "rejected", str(err)
                    if cap is not None:
                        used_captions[cap.rel] = f"caption of a rejected image ({e.rel})"
                    bar.update(1)
                    continue
                except Exception as err:  # reading failed, or a decoder bug: report it, never stop the run
                    if isinstance(err, OSError):
                        rec.reason = f"cannot read the file: {err}"
                    else:
                        logger.warning("Unexpected error preparing %s", e.rel, exc_info=True)
                        rec.reason = f"unexpected error while preparing ({type(err).__name__}: {err})"
                    rec.status = "rejected"
                    if cap is not None:
                        used_captions[cap.rel] = f"caption of a rejected image ({e.rel})"
                    bar.update(1)
                    continue
                rec.flags += crop_flags
                rec.pixel_sha256 = _pixel_sha256(dec.image)
                rec.phash = f"{perceptual_hash(dec.image):016x}"
                rec.color_sig = color_signature(dec.image).hex()

                folder, stem, rec.repeats = names[e.rel]
                base = f"{folder}/{stem}" if folder else stem
                rel_out, n = base + ext_out, 2
                while rel_out.lower() in used:
                    rel_out, n = f"{base}-{n}{ext_out}", n + 1
                if PurePosixPath(rel_out).stem != p.stem:
                    rec.flags.append("renamed")
                used.add(rel_out.lower())
                rec.prepared = rel_out
                rec.prepared_size = out_img.size
                rec.bucket = select_bucket(out_img.width, out_img.height, buckets, cfg.resolution,
                                           no_upscale=not cfg.allow_upscale, step=cfg.bucket_reso_steps)
                target = tmp / rel_out
                with atomic_path(target, fsync=False) as t:
                    if cfg.image_format == "png":
                        out_img.save(t, format="PNG")
                    else:
                        out_img.save(t, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)

                if cap is not None:
                    try:
                        text, note = read_caption(cap.read())
                        if note:  # kept, written out as UTF-8; the report lists it
                            rec.flags.append("caption_not_utf8")
                            warnings.warn(f"caption {cap.rel}: {note}", UserWarning, stacklevel=2)
                        rec.caption = text.strip()
                        rec.caption_source = cap.rel
                        with atomic_path(target.with_suffix(cfg.caption_extension), fsync=False) as t:
                            t.write_text(text, encoding="utf-8")
                        used_captions.setdefault(cap.rel, "ok")
                    except OutputWriteError:
                        raise  # the output disk is full or read-only: stop, the old output is intact
                    except (RejectedInput, OSError) as err:
                        rec.flags.append("caption_unreadable")
                        used_captions[cap.rel] = "rejected:" + str(err)
                elif cap_ext:
                    rec.flags.append("no_caption")
                t_img = out_img.copy()
                t_img.thumbnail((200, 200), Image.Resampling.LANCZOS)
                thumbs[rec.name] = t_img
                ok.append(rec)
                bar.update(1)
        finally:
            bar.close()

        for key, e in sorted(captions.items(), key=lambda kv: kv[1].rel):
            what = used_captions.get(e.rel)
            if what == "ok":
                continue
            if what is None:
                records.append(FileRecord(source=e.rel, kind="caption", status="skipped",
                                          reason="caption file without an image", file_bytes=e.size))
            elif what.startswith("rejected:"):
                records.append(FileRecord(source=e.rel, kind="caption", status="rejected",
                                          reason=what[len("rejected:"):], file_bytes=e.size))
            else:
                records.append(FileRecord(source=e.rel, kind="caption", status="skipped", reason=what,
                                          file_bytes=e.size))

        embeddings = None
        if clip is not None and len(ok) > 1:
            embeddings = np.concatenate([
                clip_embeddings([_open_rgb(tmp / r.prepared) for r in ok[s:s + 64]], *clip)
                for s in range(0, len(ok), 64)])
        del clip
        groups = find_duplicates(ok, cfg.near_dup_threshold, embeddings, cfg.clip_threshold)

        report_dir = tmp / REPORT_DIR
        final_report = output / REPORT_DIR
        by_name = {r.name: r for r in ok}
        _duplicate_sheets(groups, by_name, thumbs, tmp, report_dir, final_report, fsync=False)
        table = compute_bucket_table(ok)
        plot_buckets(table, report_dir / "buckets.png", cfg.resolution, fsync=False)
        sheets = _contact_sheets(tmp, ok, thumbs, report_dir, fsync=False)
        records.sort(key=lambda r: (r.source, r.kind))
        _write_manifest(tmp, cfg, records, groups, source_kind, created, fsync=False)
        with atomic_path(report_dir / "prepare_config.toml", fsync=False) as t:
            t.write_text(config_to_toml(cfg), encoding="utf-8")

        report = PrepareReport(
            config=cfg, output_dir=output, items=ok,
            rejected=[r for r in records if r.status == "rejected"],
            skipped=[r for r in records if r.status == "skipped"],
            duplicate_groups=groups, bucket_table=table,
            manifest_json=output / MANIFEST_JSON, manifest_csv=output / MANIFEST_CSV,
            contact_sheets=[final_report / p.name for p in sheets], bucket_plot=final_report / "buckets.png",
            report_text=final_report / "report.txt", config_path=final_report / "prepare_config.toml")
        with atomic_path(report_dir / "report.txt", fsync=False) as t:
            t.write_text(report.summary() + "\n", encoding="utf-8")
    logger.info("Prepared %d images into %s (%d rejected, %d skipped, %d duplicate groups)", len(ok), output,
                len(report.rejected), len(report.skipped), len(groups))
    return report


# =============================================================================================
# The user's decisions: drop and restore
# =============================================================================================

def _resolve_names(files: list[FileRecord], names: Sequence[str]) -> list[FileRecord]:
    """The prepared (ok or dropped) image records that `names` refer to; unknown names raise."""
    statuses = {"ok", "dropped"}
    chosen: list[FileRecord] = []
    unknown: list[str] = []
    for name in names:
        key = str(name).replace("\\", "/")
        hits = [r for r in files if r.kind == "image" and r.status in statuses and key in (
            r.prepared, r.source, r.prepared.removeprefix(DROPPED_DIR + "/"))]
        if not hits:
            hits = [r for r in files if r.kind == "image" and r.status in statuses
                    and PurePosixPath(r.prepared).name == PurePosixPath(key).name]
            if len(hits) > 1:
                raise ValueError(f"{name!r} matches several images ({', '.join(r.prepared for r in hits)}); "
                                 f"give the path inside the prepared folder")
        if not hits:
            unknown.append(str(name))
        elif hits[0] not in chosen:
            chosen.append(hits[0])
    if unknown:
        raise ValueError(f"Not in the prepared set: {', '.join(unknown)}. "
                         f"Names are paths inside the prepared folder, as the report lists them.")
    return chosen


def _move_images(prepared_dir: Path, names: Sequence[str], drop: bool) -> list[str]:
    folder = Path(prepared_dir)
    data = load_manifest(folder)
    files = [FileRecord.from_dict(d) for d in data["files"]]
    cfg_data = {k: v for k, v in data["config"].items() if k in {f.name for f in dataclasses.fields(PrepareConfig)}}
    cfg = PrepareConfig(**cfg_data)
    chosen = [r for r in _resolve_names(files, names) if r.status == ("ok" if drop else "dropped")]
    root = folder.resolve()
    moved: list[str] = []
    for r in chosen:
        rel = r.prepared
        new_rel = f"{DROPPED_DIR}/{rel}" if drop else rel.removeprefix(DROPPED_DIR + "/")
        src, dst = folder / rel, folder / new_rel
        if not (_is_within(src.resolve(), root) and _is_within(dst.resolve(), root)):
            raise ValueError(f"manifest entry {rel!r} points outside {folder}; refusing to move it")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            os.replace(src, dst)
        elif not dst.exists():
            action = "drop" if drop else "restore"
            raise FileNotFoundError(f"{src} is missing from the prepared folder; cannot {action} it")
        cap_ext = cfg.caption_extension
        if cap_ext and src.with_suffix(cap_ext).exists():
            os.replace(src.with_suffix(cap_ext), dst.with_suffix(cap_ext))
        r.prepared = new_rel
        r.status = "dropped" if drop else "ok"
        r.reason = "dropped by the user" if drop else ""
        moved.append(rel if drop else new_rel)
    groups = [DuplicateGroup(g["kind"], g["members"], g.get("scores", {})) for g in data.get("duplicate_groups", [])]
    _write_manifest(folder, cfg, files, groups, data.get("source_kind", ""), data.get("created", ""))
    report_dir = folder / REPORT_DIR
    ok = [r for r in files if r.status == "ok"]
    plot_buckets(compute_bucket_table(ok), report_dir / "buckets.png", cfg.resolution)
    _contact_sheets(folder, ok, {}, report_dir, fsync=True)
    return moved


def drop_images(prepared_dir: str | Path, names: Sequence[str]) -> list[str]:
    """Move chosen images (and their captions) from the prepared copy into `prepared_dir/_dropped/`.

    `names` are paths inside the prepared folder as the report lists them (a source path or a unique
    file name also works). The manifest marks them "dropped", the bucket table, plot and contact
    sheet are redrawn; the source is never touched. Returns the names moved (already dropped ones are
    left as they are, so re-running a notebook cell is harmless). Unknown names raise before anything
    moves. `restore_images` undoes it.
    """
    return _move_images(Path(prepared_dir), list(names), drop=True)


def restore_images(prepared_dir: str | Path, names: Sequence[str]) -> list[str]:
    """Undo `drop_images`: move images back from `_dropped/` and mark them ok again; returns their names."""
    return _move_images(Path(prepared_dir), list(names), drop=False)
