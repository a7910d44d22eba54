"""Reading a user's files safely: the entries of a folder or a zip (unsafe members refused), any supported
image decoded to RGB with flags saying what was done (EXIF rotation, CMYK, 16-bit, alpha, ICC), and
caption files in any common encoding."""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .records import FileRecord

HEIC_EXTENSIONS = frozenset({".heic", ".heif"})


#: Extensions treated as images (anything else is "skipped: not an image").
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}  # what a training set holds
INGEST_EXTENSIONS = frozenset(IMAGE_EXTENSIONS | {".jpe", ".jfif", ".avif"} | HEIC_EXTENSIONS)


HEIC_MISSING = "HEIC decoder not installed: pip install pillow-heif"


NOT_AN_IMAGE = "not an image"


MAX_FILE_BYTES = 1 << 30  # one source file larger than 1 GiB is refused before it is read


_EXIF_ORIENTATION = 0x0112


@dataclass
class SourceEntry:
    """One file of the source (folder or zip): its relative path, size and a reader for its bytes."""
    rel: str                                  # posix path relative to the source root
    size: int
    read: Callable[[], bytes]
    problem: str | None = None                # set when the entry must be rejected unread


def folder_entries(root: Path) -> tuple[list[SourceEntry], list[FileRecord]]:
    """The files under `root` to read (links and system folders skipped, with a record of why)."""
    entries: list[SourceEntry] = []
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
                entries.append(SourceEntry(rel, 0, lambda: b"", problem=f"cannot read the file: {e.strerror or e}"))
                continue
            entries.append(SourceEntry(rel, size, (lambda p=path: p.read_bytes())))
    return entries, skipped


def _unsafe_member(name: str) -> bool:
    """True for zip members that would land outside the extraction folder (zip-slip) or name a drive."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    return any(part == ".." for part in re.split(r"[\\/]", name))


@contextmanager
def zip_entries(path: Path) -> Iterator[list[SourceEntry]]:
    """The members of a zip file to read; unsafe paths (zip-slip) and oversized members are marked, not read."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a valid zip file ({e}). Re-create the zip or pass the folder "
                         f"instead.") from None
    with zf:
        entries: list[SourceEntry] = []
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
            entries.append(SourceEntry(rel, info.file_size, read, problem))
        entries.sort(key=lambda e: e.rel)
        yield entries


class RejectedInput(ValueError):
    """A source file cannot be used; the message is the reason shown to the user."""


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
    alpha: Image.Image | None = None          # the transparency ("L"), when some pixel was not opaque


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
    alpha = None
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
                alpha = rgba.getchannel("A")
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
    return _Decoded(image=im, size=im.size, mode=mode, format=fmt, flags=flags, alpha=alpha)


class CaptionDecodeError(ValueError):
    """A caption file holds no text (binary data, or not decodable)."""


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """Caption text from a file's bytes, and a note when it was not UTF-8.

    UTF-8 (a BOM allowed) and UTF-16 with a BOM are read as they are. Anything else is read as Windows-1252
    (what Notepad and older Windows tools write; it reads Latin-1 text the same), so the text is kept and
    the note says so; the five bytes cp1252 leaves undefined become U+FFFD. Binary data raises
    `CaptionDecodeError`.
    """
    note = None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise CaptionDecodeError(f"caption file is not valid UTF-16 ({e.reason} at byte {e.start})") from None
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            bad = data[e.start:e.start + 1].hex()
            text = data.decode("cp1252", errors="replace")
            note = (f"not valid UTF-8 (byte 0x{bad} at position {e.start}); read as Windows-1252 (cp1252)"
                    + (", with undecodable bytes as \ufffd" if "\ufffd" in text else "")
                    + ": check the accented letters, and re-save the file as UTF-8")
    if any(not (c.isprintable() or c in "\r\n\t") for c in text.replace("\ufeff", "")):
        raise CaptionDecodeError("caption file holds binary data, not text")
    return text, note


def read_caption_file(path: Path) -> str:
    """The text of a caption file (see `decode_caption`); a non-UTF-8 file warns, naming the file."""
    text, note = decode_caption(Path(path).read_bytes())
    if note:
        warnings.warn(f"caption file {path}: {note}", UserWarning, stacklevel=2)
    return text


def read_caption(data: bytes) -> tuple[str, str | None]:
    """Caption text from file bytes and a note when it was not UTF-8 (`decode_caption`); raise
    `RejectedInput` when the file holds no text."""
    try:
        return decode_caption(data)
    except CaptionDecodeError as e:
        raise RejectedInput(f"{e}; the image is kept without a caption") from None
