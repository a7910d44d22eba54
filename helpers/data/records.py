"""What preparing a dataset found: one record per source file (status, reason, sizes, flags, caption),
duplicate groups, the report a user reads, and the manifest written beside the prepared copy."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_path
from ..config import PrepareConfig

MANIFEST_FORMAT = "sd-lora-helpers/prepared/1"


MANIFEST_JSON = "manifest.json"


MANIFEST_CSV = "manifest.csv"


REPORT_DIR = "_report"


DROPPED_DIR = "_dropped"
MASK_DIR = "_masks"   # loss masks beside the prepared images, where the trainer looks (data/masks.MASK_FOLDER)


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
    faces: int = 0                            # frontal faces found in the image (0 also when detection is off)
    face_box: list[float] | None = None       # the largest face, [x0, y0, x1, y1] in prepared-image pixels
    face_coverage: float | None = None        # share of the prepared image that box fills (inside it)
    mask: str = ""                            # the loss mask written for it, relative to output_dir

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
    mask_sheet: Path | None = None            # image | mask | overlay rows, when masks were made

    @property
    def with_face(self) -> list[FileRecord]:
        """Prepared images in which a face was found."""
        return [r for r in self.items if r.face_box is not None]

    @property
    def small_faces(self) -> list[FileRecord]:
        """Prepared images whose face fills less of the crop than `min_face_coverage` (flag "small_face")."""
        return [r for r in self.items if "small_face" in r.flags]

    @property
    def is_face_set(self) -> bool:
        """Whether the set is about a face: crop="face", or a face in at least half of the images."""
        return self.config.crop == "face" or (bool(self.items) and 2 * len(self.with_face) >= len(self.items))

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
        if cfg.detect_faces and self.items:
            lines += self._face_lines()
        masked = [r for r in self.items if r.mask]
        if cfg.masks != "none":
            lines.append(f"  masks ({cfg.masks}): {len(masked)} of {len(self.items)} images have one, in "
                         f"{self.output_dir / MASK_DIR}" + ("" if len(masked) == len(self.items) else
                                                            "; the others train on every pixel"))
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

    def _face_lines(self) -> list[str]:
        """Faces found and how much of each crop they fill; the small-face warning only for a set about a face."""
        faced = self.with_face
        if not faced:   # a set of flowers or products: nothing to say, unless the crop was to follow faces
            if self.config.crop != "face":
                return []
            return ['  faces: none found (crop="face" placed every crop by saliency)']
        cover = sorted(r.face_coverage or 0.0 for r in faced)
        lines = [f"  faces: found in {len(faced)} of {len(self.items)} images; the face fills "
                 f"{cover[0]:.0%}-{cover[-1]:.0%} of the crop (median {cover[len(cover) // 2]:.0%})"]
        small = self.small_faces
        if small and self.is_face_set:
            lines.append(f"  WARNING: the face fills under {self.config.min_face_coverage:.0%} of the crop in "
                         f"{len(small)} image(s): the model learns the face from few pixels. Crop closer "
                         f"(crop=\"face\", face_margin) or replace them:")
            lines += [f"    {r.name}: {r.face_coverage:.1%}" for r in small[:10]]
            if len(small) > 10:
                lines.append(f"    ... and {len(small) - 10} more (flag 'small_face' in the manifest)")
        return lines


_CSV_COLUMNS = ("source", "kind", "status", "reason", "prepared", "width", "height", "bucket", "original_width",
                "original_height", "original_mode", "original_format", "file_bytes", "sha256", "repeats",
                "caption", "caption_source", "flags", "phash", "faces", "face_box", "face_coverage", "mask")


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
                         r.caption_source, ";".join(r.flags), r.phash, r.faces,
                         " ".join(f"{v:g}" for v in r.face_box) if r.face_box else "",
                         f"{r.face_coverage:.4f}" if r.face_coverage is not None else "", r.mask])
    return buf.getvalue()


def write_manifest(folder: Path, cfg: PrepareConfig, records: Sequence[FileRecord], groups: Sequence[DuplicateGroup],
                   source_kind: str, created: str, fsync: bool = True) -> None:
    """Write the prepared set's manifest (JSON and CSV): settings, source, every file's record, duplicates."""
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


def is_prepared_set(folder: Path) -> bool:
    """Whether `folder` holds a training set this package prepared (its manifest says so)."""
    try:
        return json.loads((folder / MANIFEST_JSON).read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
    except Exception:
        return False


def compute_bucket_table(records: Sequence[FileRecord]) -> list[tuple[tuple[int, int], int]]:
    """(bucket, number of images) over records with status ok, sorted by bucket."""
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for r in records:
        if r.status == "ok" and r.bucket is not None:
            counts[(int(r.bucket[0]), int(r.bucket[1]))] += 1
    return sorted(counts.items())
