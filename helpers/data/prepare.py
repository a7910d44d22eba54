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
                                                buckets.png, duplicates/*.png, masks.png
      _masks/                                   loss masks (masks="alpha" | "face" | "clipseg"), same names
      _dropped/                                 images the user dropped with drop_images
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from ..atomic import OutputWriteError, atomic_dir, atomic_path
from ..config import ConfigError, PrepareConfig, color_text, config_to_toml, parse_color
from .crops import plan_crop
from .faces import detect_faces, face_coverage, load_face_detector
from .dataset import KOHYA_FOLDER, make_buckets, select_bucket
from .decode import (
    INGEST_EXTENSIONS,
    MAX_FILE_BYTES,
    NOT_AN_IMAGE,
    RejectedInput,
    SourceEntry,
    folder_entries,
    zip_entries,
    decode_image,
    read_caption,
)
from .duplicates import pixel_digest, clip_embeddings, color_signature, find_duplicates, load_clip, perceptual_hash
from .records import (
    DROPPED_DIR,
    MANIFEST_CSV,
    MANIFEST_JSON,
    REPORT_DIR,
    DuplicateGroup,
    FileRecord,
    PrepareReport,
    is_prepared_set,
    write_manifest,
    compute_bucket_table,
    load_manifest,
)
from .sheets import write_contact_sheets, write_duplicate_sheets, open_rgb, plot_buckets

logger = logging.getLogger(__name__)


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
            if not is_prepared_set(out):
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
            m = KOHYA_FOLDER.match(d)
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
            match = KOHYA_FOLDER.match(dirs[k])
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
            detect_faces: bool = True, face_margin: float = 0.5, min_face_coverage: float = 0.25,
            masks: str = "none", mask_prompt: str = "", mask_model: str | None = None, mask_threshold: float = 0.3,
            overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Turn a folder or .zip of photos into a clean prepared copy in `output_dir`, with a manifest and a report.

    See `PrepareConfig` for the settings. The source is never modified; `output_dir` must lie outside
    it, and an existing prepared set there is replaced (atomically) only with `overwrite=True`.
    """
    bg = background if isinstance(background, str) else color_text(parse_color(background))
    cfg = PrepareConfig(source=str(source), output_dir=str(output_dir), resolution=resolution, crop=crop,
                        min_size=min_size, max_pixels=max_pixels, max_side=max_side, allow_upscale=allow_upscale,
                        background=bg, caption_extension=caption_extension, image_format=image_format,
                        jpeg_quality=jpeg_quality,
                        near_dup_threshold=-1 if near_dup_threshold is None else near_dup_threshold,
                        clip_model=clip_model,
                        clip_threshold=clip_threshold, min_bucket_reso=min_bucket_reso,
                        max_bucket_reso=max_bucket_reso, bucket_reso_steps=bucket_reso_steps,
                        detect_faces=detect_faces, face_margin=face_margin, min_face_coverage=min_face_coverage,
                        masks=masks, mask_prompt=mask_prompt, mask_model=mask_model, mask_threshold=mask_threshold)
    return prepare_from_config(cfg, overwrite=overwrite, progress=progress)


def prepare_from_config(cfg: PrepareConfig, *, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """`prepare` for a ready-made `PrepareConfig` (what the CLI and widgets build).

    Sorts the source's files, prepares each image (decode, check, crop, save, caption) into a temporary
    copy, groups duplicates, writes the manifest and the report, then renames the copy into place."""
    from tqdm.auto import tqdm

    if not cfg.source:
        raise ConfigError("source must name a folder or a .zip file")
    if not cfg.output_dir:
        raise ConfigError("output_dir must name the folder for the prepared copy")
    source, output = Path(cfg.source).expanduser(), Path(cfg.output_dir).expanduser()
    source_kind = _check_paths(source, output, overwrite)
    clip = load_clip(cfg.clip_model) if cfg.clip_model else None  # fail before the long loop, not after it
    seg = None
    if cfg.masks == "clipseg":
        from .masking import load_clipseg

        seg = load_clipseg(cfg.mask_model)
    if cfg.detect_faces:
        load_face_detector()  # scikit-image missing: say so now, not as a rejection of every image
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")

    with _source_entries(source, source_kind) as (entries, skipped), atomic_dir(output) as tmp:
        records, images, captions = _sort_entries(entries, cfg.caption_extension.lower())
        records = list(skipped) + records
        job = _ImageJob(cfg, tmp, _out_names([e.rel for e in images]))
        caption_outcomes: dict[str, str] = {}   # caption rel -> "ok" or why it was not used
        thumbs: dict[str, Image.Image] = {}
        ok: list[FileRecord] = []
        for e in tqdm(images, desc="preparing images", unit="img", disable=not progress):
            p = PurePosixPath(e.rel)
            cap = captions.get((str(p.parent), p.stem))
            rec, thumb, outcome = job.prepare(e, cap)
            records.append(rec)
            if outcome == "ok":
                caption_outcomes.setdefault(cap.rel, "ok")
            elif outcome is not None:
                caption_outcomes[cap.rel] = outcome
            if thumb is not None:
                thumbs[rec.name] = thumb
                ok.append(rec)
        records += _caption_records(captions, caption_outcomes)

        embeddings = None
        if clip is not None and len(ok) > 1:
            embeddings = np.concatenate([
                clip_embeddings([open_rgb(tmp / r.prepared) for r in ok[s:s + 64]], *clip)
                for s in range(0, len(ok), 64)])
        del clip
        if seg is not None:
            _clipseg_masks(seg, cfg, tmp, ok, progress)
        groups = find_duplicates(ok, cfg.near_dup_threshold, embeddings, cfg.clip_threshold)
        report = _write_report(cfg, tmp, output, records, ok, thumbs, groups, source_kind, created)
    logger.info("Prepared %d images into %s (%d rejected, %d skipped, %d duplicate groups)", len(ok), output,
                len(report.rejected), len(report.skipped), len(groups))
    return report


@contextmanager
def _source_entries(source: Path, source_kind: str) -> Iterator[tuple[list[SourceEntry], list[FileRecord]]]:
    """The files of the source (a zip stays open while they are read) and the ones skipped unread."""
    if source_kind == "zip":
        with zip_entries(source) as entries:
            yield entries, []
    else:
        yield folder_entries(source)


def _sort_entries(entries: list[SourceEntry], cap_ext: str
                  ) -> tuple[list[FileRecord], list[SourceEntry], dict[tuple[str, str], SourceEntry]]:
    """Records of the files not read (with why), the images to prepare, and the captions by (folder, stem)."""
    records: list[FileRecord] = []
    images: list[SourceEntry] = []
    captions: dict[tuple[str, str], SourceEntry] = {}
    others: list[SourceEntry] = []
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
    records += [FileRecord(source=e.rel, kind="other", status="skipped", reason=NOT_AN_IMAGE, file_bytes=e.size)
                for e in others]
    return records, images, captions


class _ImageJob:
    """Prepares one image after another into the temporary copy `tmp`; keeps the output names unique."""

    def __init__(self, cfg: PrepareConfig, tmp: Path, names: dict[str, tuple[str, str, int]]):
        self.cfg, self.tmp, self.names = cfg, tmp, names
        self.buckets = make_buckets(cfg.resolution, cfg.min_bucket_reso - cfg.min_bucket_reso % cfg.bucket_reso_steps,
                                    cfg.max_bucket_reso + (-cfg.max_bucket_reso) % cfg.bucket_reso_steps,
                                    cfg.bucket_reso_steps)
        self.ext_out = ".png" if cfg.image_format == "png" else ".jpg"
        self.used: set[str] = set()

    def prepare(self, e: SourceEntry, cap: SourceEntry | None) -> tuple[FileRecord, Image.Image | None, str | None]:
        """The image's record, its thumbnail (None when rejected) and what became of its caption file
        ("ok", why it was not used, or None when it has none). Never raises for a bad input file."""
        cfg, p = self.cfg, PurePosixPath(e.rel)
        rec = FileRecord(source=e.rel, kind="image", file_bytes=e.size)
        try:
            if e.size > MAX_FILE_BYTES:
                raise RejectedInput(f"file too large ({e.size:,} bytes; limit {MAX_FILE_BYTES:,})")
            data = e.read()
            rec.file_bytes = len(data)
            rec.sha256 = hashlib.sha256(data).hexdigest()
            dec = decode_image(data, max_pixels=cfg.max_pixels, background=cfg.background_rgb, ext=p.suffix)
            rec.original_size, rec.original_mode, rec.original_format = dec.size, dec.mode, dec.format
            rec.flags = list(dec.flags)
            min_size = cfg.effective_min_size
            if min(dec.size) < min_size:
                raise RejectedInput(f"too small: {dec.size[0]}x{dec.size[1]} (short side "
                                    f"{min(dec.size)} < min_size {min_size})")
            faces = detect_faces(dec.image) if cfg.detect_faces else []
            plan, crop_flags = plan_crop(dec.image, cfg, self.buckets, faces[0] if faces else None)
            out_img = plan.apply(dec.image, fill=cfg.background_rgb)
        except Exception as err:  # a bad file, a failed read or a decoder bug: report it, never stop the run
            rec.status = "rejected"
            if isinstance(err, RejectedInput):
                rec.reason = str(err)
            elif isinstance(err, OSError):
                rec.reason = f"cannot read the file: {err}"
            else:
                logger.warning("Unexpected error preparing %s", e.rel, exc_info=True)
                rec.reason = f"unexpected error while preparing ({type(err).__name__}: {err})"
            return rec, None, None if cap is None else f"caption of a rejected image ({e.rel})"
        rec.flags += crop_flags
        rec.faces = len(faces)
        box = plan.map_box(faces[0]) if faces else None
        if box is not None:
            rec.face_box = box.as_list()
            rec.face_coverage = round(face_coverage(box, out_img.size), 4)
            if rec.face_coverage < cfg.min_face_coverage:
                rec.flags.append("small_face")
        rec.pixel_sha256 = pixel_digest(dec.image)
        rec.phash = f"{perceptual_hash(dec.image):016x}"
        rec.color_sig = color_signature(dec.image).hex()
        target = self._save(rec, e, out_img)
        self._mask(rec, plan.apply(dec.alpha, mask=True) if dec.alpha is not None else None, box)
        outcome = self._caption(rec, cap, target) if cap is not None else None
        if cap is None and cfg.caption_extension:
            rec.flags.append("no_caption")
        thumb = out_img.copy()
        thumb.thumbnail((200, 200), Image.Resampling.LANCZOS)
        return rec, thumb, outcome

    def _save(self, rec: FileRecord, e: SourceEntry, out_img: Image.Image) -> Path:
        """Write the prepared image under a unique name (kohya folders kept); fills the record's output fields."""
        cfg = self.cfg
        folder, stem, rec.repeats = self.names[e.rel]
        base = f"{folder}/{stem}" if folder else stem
        rel_out, n = base + self.ext_out, 2
        while rel_out.lower() in self.used:
            rel_out, n = f"{base}-{n}{self.ext_out}", n + 1
        if PurePosixPath(rel_out).stem != PurePosixPath(e.rel).stem:
            rec.flags.append("renamed")
        self.used.add(rel_out.lower())
        rec.prepared = rel_out
        rec.prepared_size = out_img.size
        rec.bucket = select_bucket(out_img.width, out_img.height, self.buckets, cfg.resolution,
                                   no_upscale=not cfg.allow_upscale, step=cfg.bucket_reso_steps)
        target = self.tmp / rel_out
        with atomic_path(target, fsync=False) as t:
            if cfg.image_format == "png":
                out_img.save(t, format="PNG")
            else:
                out_img.save(t, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
        return target

    def _mask(self, rec: FileRecord, alpha: Image.Image | None, box) -> None:
        """Write the loss mask of masks="alpha" (the transparency, cropped as the image) or "face"."""
        from .masking import face_mask, mask_rel, save_mask

        mode = self.cfg.masks
        if mode == "alpha":
            mask = alpha
            if mask is None:
                rec.flags.append("no_mask")  # fully opaque: nothing to mask, it trains on every pixel
        elif mode == "face":
            mask = face_mask(rec.prepared_size, box) if box is not None else None
            if mask is None:
                rec.flags.append("no_mask")
        else:
            return
        if mask is not None:
            rec.mask = mask_rel(rec.prepared)
            save_mask(mask, self.tmp / rec.mask, fsync=False)

    def _caption(self, rec: FileRecord, cap: SourceEntry, target: Path) -> str:
        """Copy the image's caption beside it as UTF-8; "ok", or "rejected:<why>" for an unreadable one."""
        try:
            text, note = read_caption(cap.read())
            if note:  # kept, written out as UTF-8; the report lists it
                rec.flags.append("caption_not_utf8")
                warnings.warn(f"caption {cap.rel}: {note}", UserWarning, stacklevel=4)
            rec.caption = text.strip()
            rec.caption_source = cap.rel
            with atomic_path(target.with_suffix(self.cfg.caption_extension), fsync=False) as t:
                t.write_text(text, encoding="utf-8")
            return "ok"
        except OutputWriteError:
            raise  # the output disk is full or read-only: stop, the old output is intact
        except (RejectedInput, OSError) as err:
            rec.flags.append("caption_unreadable")
            return "rejected:" + str(err)


def _clipseg_masks(seg, cfg: PrepareConfig, tmp: Path, ok: list[FileRecord], progress: bool) -> None:
    """masks="clipseg": a mask per prepared image from `cfg.mask_prompt`; the model is freed afterwards."""
    from .masking import write_clipseg_masks

    try:
        found = write_clipseg_masks(seg, tmp, [r.prepared for r in ok], cfg.mask_prompt, cfg.mask_threshold,
                                    progress=progress, fsync=False)
    finally:
        seg.close()
    for r in ok:
        if found[r.prepared] is None:
            r.flags.append("no_mask")
        else:
            r.mask = found[r.prepared]


def _caption_records(captions: dict[tuple[str, str], SourceEntry], outcomes: dict[str, str]) -> list[FileRecord]:
    """Records of the caption files that were not used: no image, a rejected image, or unreadable."""
    records = []
    for _, e in sorted(captions.items(), key=lambda kv: kv[1].rel):
        what = outcomes.get(e.rel)
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
    return records


def _write_report(cfg: PrepareConfig, tmp: Path, output: Path, records: list[FileRecord], ok: list[FileRecord],
                  thumbs: dict[str, Image.Image], groups, source_kind: str, created: str) -> PrepareReport:
    """Duplicate sheets, bucket plot, contact sheets, manifest, config and report text, into `tmp`."""
    report_dir = tmp / REPORT_DIR
    final_report = output / REPORT_DIR
    by_name = {r.name: r for r in ok}
    write_duplicate_sheets(groups, by_name, thumbs, tmp, report_dir, final_report, fsync=False)
    table = compute_bucket_table(ok)
    plot_buckets(table, report_dir / "buckets.png", cfg.resolution, fsync=False)
    sheets = write_contact_sheets(tmp, ok, thumbs, report_dir, fsync=False)
    if any(r.mask for r in ok):
        from .masking import mask_sheet_for

        mask_sheet_for(tmp, ok, report_dir / "masks.png")
    records.sort(key=lambda r: (r.source, r.kind))
    write_manifest(tmp, cfg, records, groups, source_kind, created, fsync=False)
    with atomic_path(report_dir / "prepare_config.toml", fsync=False) as t:
        t.write_text(config_to_toml(cfg), encoding="utf-8")
    report = PrepareReport(
        config=cfg, output_dir=output, items=ok,
        rejected=[r for r in records if r.status == "rejected"],
        skipped=[r for r in records if r.status == "skipped"],
        duplicate_groups=groups, bucket_table=table,
        manifest_json=output / MANIFEST_JSON, manifest_csv=output / MANIFEST_CSV,
        contact_sheets=[final_report / p.name for p in sheets], bucket_plot=final_report / "buckets.png",
        report_text=final_report / "report.txt", config_path=final_report / "prepare_config.toml",
        mask_sheet=final_report / "masks.png" if any(r.mask for r in ok) else None)
    with atomic_path(report_dir / "report.txt", fsync=False) as t:
        t.write_text(report.summary() + "\n", encoding="utf-8")
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


def _read_set(folder: Path) -> tuple[dict, list[FileRecord], PrepareConfig]:
    """A prepared set's manifest: (its data, its records, the settings that made it)."""
    data = load_manifest(folder)
    files = [FileRecord.from_dict(d) for d in data["files"]]
    cfg_data = {k: v for k, v in data["config"].items() if k in {f.name for f in dataclasses.fields(PrepareConfig)}}
    return data, files, PrepareConfig(**cfg_data)


def _write_set(folder: Path, data: dict, cfg: PrepareConfig, files: list[FileRecord]) -> None:
    """Rewrite the manifest of `_read_set` with changed records (duplicate groups, source and date kept)."""
    groups = [DuplicateGroup(g["kind"], g["members"], g.get("scores", {})) for g in data.get("duplicate_groups", [])]
    write_manifest(folder, cfg, files, groups, data.get("source_kind", ""), data.get("created", ""))


def _move_images(prepared_dir: Path, names: Sequence[str], drop: bool) -> list[str]:
    folder = Path(prepared_dir)
    data, files, cfg = _read_set(folder)
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
    _write_set(folder, data, cfg, files)
    report_dir = folder / REPORT_DIR
    ok = [r for r in files if r.status == "ok"]
    plot_buckets(compute_bucket_table(ok), report_dir / "buckets.png", cfg.resolution)
    write_contact_sheets(folder, ok, {}, report_dir, fsync=True)
    return moved


def update_records(prepared_dir: str | Path, changes: dict[str, dict]) -> None:
    """Set fields of prepared images' manifest records ({prepared name: {field: value}}) and rewrite the manifest
    and the mask sheet; the images themselves are not touched."""
    folder = Path(prepared_dir)
    data, files, cfg = _read_set(folder)
    known = {f.name for f in dataclasses.fields(FileRecord)}
    for r in files:
        for name, value in changes.get(r.prepared, {}).items():
            if name not in known:
                raise ValueError(f"FileRecord has no field {name!r}")
            setattr(r, name, value)
    _write_set(folder, data, cfg, files)
    masked = [r for r in files if r.status == "ok" and r.mask]
    if masked:
        from .masking import mask_sheet_for

        mask_sheet_for(folder, masked, folder / REPORT_DIR / "masks.png")


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
