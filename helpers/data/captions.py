"""Caption editing over a whole image set (the "02_tagging" notebook's backend), every change undoable.

A set is a folder of images with a caption file beside each (`a.png` + `a.txt`), kohya "<N>_<name>"
subfolders included. Every write goes through `write_captions`, which first snapshots the folder's
caption files into a hidden `.caption_history/<entry>/`, so `undo(folder)` can put them back exactly.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from ..atomic import atomic_dir, write_bytes, write_text
from .decode import IMAGE_EXTENSIONS, CaptionDecodeError, read_caption_file

HISTORY_DIR = ".caption_history"
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "sd-lora-helpers/caption-history/1"
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")
_ENTRY_NAME = re.compile(r"^(\d{6})-(\d{8}T\d{6})$")


# =============================================================================================
# Images of a set and their caption files
# =============================================================================================

def _norm_extension(extension: str) -> str:
    if not extension or extension.strip() in (".", ""):
        raise ValueError("caption extension must not be empty (e.g. '.txt' or '.caption')")
    extension = extension.strip()
    return extension if extension.startswith(".") else "." + extension


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path) -> list[str]:
    """Relative paths (POSIX, e.g. "a.png", "10_sks/b.jpg") of a set's images, sorted.

    Same conventions as `dataset.load_image_folder`: images in the folder itself and in kohya
    "<N>_<name>" subfolders; hidden files, `_dropped/` and other subfolders are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Caption folder not found (or not a folder): {folder}")
    found: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            match = KOHYA_FOLDER.match(entry.name)
            if match is None or int(match.group(1)) < 1:
                continue  # _dropped/, notes/, ...
            found += [f"{entry.name}/{sub.name}" for sub in sorted(entry.iterdir()) if _is_image_file(sub)]
        elif _is_image_file(entry):
            found.append(entry.name)
    return sorted(found)


def _rel_key(folder: Path, key: str | Path) -> str:
    """Normalize an image key to a POSIX path relative to `folder`; refuse paths outside it."""
    p = Path(key)
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(folder.resolve())
        except ValueError:
            raise ValueError(f"image {key} is not inside the caption folder {folder}") from None
    rel = PurePosixPath(*p.parts) if p.parts else PurePosixPath(".")
    if str(rel) in ("", ".") or ".." in rel.parts:
        raise ValueError(f"bad image key {str(key)!r}: use a path relative to {folder}, e.g. 'a.png' or '10_sks/b.jpg'")
    if rel.parts[0] == HISTORY_DIR:
        raise ValueError(f"bad image key {str(key)!r}: {HISTORY_DIR}/ holds the caption history, not images")
    return str(rel)


def caption_path(folder: str | Path, image: str, extension: str = ".txt") -> Path:
    """The caption file of `image` (relative to `folder`): same name, caption extension."""
    rel = PurePosixPath(image)
    return Path(folder).joinpath(*rel.parts).with_suffix(_norm_extension(extension))


def clean_caption_text(text: str) -> str:
    """One line, no leading/trailing whitespace: line breaks (and the spaces around them) become one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip()


# =============================================================================================
# History and the one write path
# =============================================================================================

def _history_root(folder: Path) -> Path:
    return folder / HISTORY_DIR


def history(folder: str | Path) -> list[Path]:
    """The folder's caption-history entries, oldest first (each a folder holding the previous captions)."""
    root = _history_root(Path(folder))
    if not root.is_dir():
        return []
    entries = [p for p in root.iterdir() if p.is_dir() and _ENTRY_NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(entries, key=lambda p: p.name)


def read_history_entry(entry: str | Path) -> dict:
    """The manifest of one history entry: note, time, extension, and which images had a caption file."""
    entry = Path(entry)
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"caption history entry {entry} is unreadable ({e}); delete that folder to drop it") from e
    if manifest.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"caption history entry {entry} has an unknown format {manifest.get('format')!r}")
    return manifest


def _snapshot(folder: Path, images: list[str], extension: str, note: str) -> Path:
    """Copy the current caption files of `images` into a new history entry; returns its path."""
    root = _history_root(folder)
    existing = history(folder)
    counter = int(_ENTRY_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1
    name = f"{counter:06d}-{time.strftime('%Y%m%dT%H%M%S')}"
    entry = root / name
    had_caption: list[str] = []
    no_caption: list[str] = []
    with atomic_dir(entry) as tmp:
        for image in images:
            src = caption_path(folder, image, extension)
            if src.is_file():
                rel_caption = PurePosixPath(image).with_suffix(extension)
                dst = tmp.joinpath(*rel_caption.parts)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
                had_caption.append(image)
            else:
                no_caption.append(image)
        manifest = {"format": _MANIFEST_FORMAT, "note": note, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "extension": extension, "had_caption": had_caption, "no_caption": no_caption}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return entry


def snapshot_captions(folder: str | Path, images: Iterable[str] = (), *, extension: str = ".txt",
                      note: str = "") -> Path:
    """Save the caption files of the whole set (and of `images`, relative paths) as a new history entry, so
    `undo` can put them back; returns the entry. `write_captions(..., history_entry=entry)` then writes without
    a new snapshot, so a long run that writes as it goes is still one undo step."""
    folder = Path(folder)
    extension = _norm_extension(extension)
    rels = {_rel_key(folder, i) for i in images}
    return _snapshot(folder, sorted(set(list_images(folder)) | rels), extension, note)


def write_captions(folder: str | Path, captions: dict[str, str], *, extension: str = ".txt", note: str = "",
                   history_entry: Path | None = None) -> Path:
    """Write captions beside their images, after snapshotting the folder's caption files for `undo`.

    Keys are image paths relative to `folder` ("a.png", "10_sks/b.jpg"); each caption is written to
    `<image stem><extension>` atomically, UTF-8 without BOM, one stripped line. Returns the history entry.
    With `history_entry` (from `snapshot_captions`, covering these images) no new snapshot is taken.
    """
    folder = Path(folder)
    extension = _norm_extension(extension)
    if not folder.is_dir():
        raise FileNotFoundError(f"Caption folder not found (or not a folder): {folder}")
    todo: dict[str, str] = {}
    targets: dict[Path, str] = {}
    for key, text in captions.items():
        rel = _rel_key(folder, key)
        target = caption_path(folder, rel, extension)
        if targets.setdefault(target, rel) != rel:
            raise ValueError(f"{targets[target]} and {rel} share the caption file {target.name}; rename one image")
        image = folder.joinpath(*PurePosixPath(rel).parts)
        if not image.is_file():
            raise FileNotFoundError(f"no image {rel} in {folder}: captions are written beside existing images")
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{rel} is not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}); captions go beside images")
        if not isinstance(text, str):
            raise TypeError(f"caption for {rel} must be a str, got {type(text).__name__}")
        todo[rel] = clean_caption_text(text)
    if history_entry is not None:
        manifest = read_history_entry(history_entry)
        saved = set(manifest["had_caption"]) | set(manifest["no_caption"])
        outside = sorted(set(todo) - saved)
        if outside:
            raise ValueError(f"{history_entry} does not cover {', '.join(outside[:5])}: undo could not restore "
                             "them; take the snapshot with those images")
        entry = Path(history_entry)
    else:
        # Snapshot the whole set (plus any written image outside the kohya layout) so undo restores everything.
        images = sorted(set(list_images(folder)) | set(todo))
        entry = _snapshot(folder, images, extension, note)
    for rel, text in todo.items():
        write_text(caption_path(folder, rel, extension), text)
    return entry


def undo(folder: str | Path) -> Path:
    """Put back the captions saved in the latest history entry, then drop that entry; returns it.

    Caption files that did not exist then are removed, so the set is exactly as it was. Calling
    `undo` again goes one more step back.
    """
    folder = Path(folder)
    entries = history(folder)
    if not entries:
        raise ValueError(f"nothing to undo: {folder} has no caption history ({HISTORY_DIR}/ is empty or missing)")
    entry = entries[-1]
    manifest = read_history_entry(entry)
    extension = manifest["extension"]
    for image in manifest["had_caption"]:
        rel_caption = PurePosixPath(_rel_key(folder, image)).with_suffix(extension)
        saved = entry.joinpath(*rel_caption.parts)
        if not saved.is_file():
            raise ValueError(f"caption history entry {entry} is incomplete: {rel_caption} is missing; nothing was undone")
    for image in manifest["had_caption"]:
        rel_caption = PurePosixPath(image).with_suffix(extension)
        write_bytes(caption_path(folder, image, extension), entry.joinpath(*rel_caption.parts).read_bytes())
    for image in manifest["no_caption"]:
        target = caption_path(folder, _rel_key(folder, image), extension)
        if target.is_file():
            target.unlink()
    shutil.rmtree(entry)
    return entry


# =============================================================================================
# A caption set in memory
# =============================================================================================

SEPARATOR = ","

# Kaomoji tags (as WD14 taggers write them) whose underscores are part of the face, not word breaks.
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@",
    "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})


class CaptionReadError(ValueError):
    """A caption file could not be read as UTF-8 text."""


def split_tags(text: str) -> tuple[str, ...]:
    """Comma-separated tags of a caption, each stripped, empty ones dropped; a sentence without commas is one tag."""
    return tuple(t.strip() for t in clean_caption_text(text).split(SEPARATOR) if t.strip())


def join_tags(tags: tuple[str, ...] | list[str]) -> str:
    """The caption text of a tag list: tags joined by ", "."""
    return ", ".join(tags)


def tag_key(tag: str) -> str:
    """How tags are compared: case-insensitive, runs of whitespace as one space."""
    return " ".join(tag.split()).casefold()


def _read_caption_file(path: Path) -> str:
    try:
        return read_caption_file(path)
    except CaptionDecodeError as e:
        raise CaptionReadError(f"caption file {path}: {e}; re-save it as UTF-8 text or delete it") from e


class CaptionSet(Mapping[str, tuple[str, ...]]):
    """Captions of a set: relative image path -> tuple of tags (immutable; operations return new sets).

    `folder` and `extension` say where `save` writes; `missing` names the images that had no
    caption file when the set was loaded (their caption is empty).
    """

    def __init__(self, captions: Mapping[str, tuple[str, ...] | list[str] | str], *, folder: str | Path | None = None,
                 extension: str = ".txt", missing: frozenset[str] | set[str] = frozenset()) -> None:
        self._captions: dict[str, tuple[str, ...]] = {}
        for image in sorted(captions):
            value = captions[image]
            tags = split_tags(value) if isinstance(value, str) else tuple(str(t) for t in value)
            self._captions[str(image)] = tags
        self.folder = Path(folder) if folder is not None else None
        self.extension = _norm_extension(extension)
        self.missing = frozenset(missing)

    def __getitem__(self, image: str) -> tuple[str, ...]:
        return self._captions[image]

    def __iter__(self):
        return iter(self._captions)

    def __len__(self) -> int:
        return len(self._captions)

    def __repr__(self) -> str:
        return f"CaptionSet({len(self)} images, folder={str(self.folder) if self.folder else None!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CaptionSet):
            return self._captions == other._captions
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def text(self, image: str) -> str:
        """The caption text of one image, as it would be written."""
        return join_tags(self._captions[image])

    def texts(self) -> dict[str, str]:
        """All caption texts, by image."""
        return {image: join_tags(tags) for image, tags in self._captions.items()}

    def replace(self, captions: Mapping[str, tuple[str, ...] | list[str] | str]) -> "CaptionSet":
        """A new set with the same folder/extension/missing and these captions."""
        return CaptionSet(captions, folder=self.folder, extension=self.extension, missing=self.missing)

    def map(self, fn) -> "CaptionSet":
        """A new set with `fn(tags) -> tags` applied to every caption."""
        return self.replace({image: tuple(fn(tags)) for image, tags in self._captions.items()})

    def save(self, *, note: str = "") -> Path | None:
        """Write the captions that differ from the files on disk through `write_captions` (undoable).

        Returns the history entry, or None when every caption file already holds these tags.
        """
        return save_captions(self, note=note)


def load_captions(folder: str | Path, extension: str = ".txt") -> CaptionSet:
    """Load the captions of every image of a set (`list_images` conventions); no caption file = empty caption.

    Raises `CaptionReadError` naming every caption file that holds no text; a caption in another encoding
    than UTF-8 (cp1252, Latin-1) is read with a warning (`decode.decode_caption`).
    """
    folder = Path(folder)
    extension = _norm_extension(extension)
    captions: dict[str, tuple[str, ...]] = {}
    missing: set[str] = set()
    bad: list[str] = []
    for image in list_images(folder):
        path = caption_path(folder, image, extension)
        if not path.is_file():
            captions[image] = ()
            missing.add(image)
            continue
        try:
            captions[image] = split_tags(_read_caption_file(path))
        except CaptionReadError as e:
            bad.append(str(e))
    if bad:
        raise CaptionReadError("\n".join(bad))
    return CaptionSet(captions, folder=folder, extension=extension, missing=missing)


def save_captions(captions: CaptionSet, folder: str | Path | None = None, *, note: str = "") -> Path | None:
    """Write a set's changed captions (tags differ from the file, or a non-empty caption has no file) via
    `write_captions`, so the change is undoable. Returns the history entry, or None if nothing changed."""
    folder = Path(folder) if folder is not None else captions.folder
    if folder is None:
        raise ValueError("this caption set has no folder: pass folder= to save_captions")
    changed: dict[str, str] = {}
    for image, tags in captions.items():
        path = caption_path(folder, image, captions.extension)
        if path.is_file():
            if split_tags(_read_caption_file(path)) == tuple(tags):
                continue
        elif not tags:
            continue
        changed[image] = join_tags(tags)
    if not changed:
        return None
    return write_captions(folder, changed, extension=captions.extension, note=note)


# =============================================================================================
# Operations (pure: each returns a new CaptionSet)
# =============================================================================================

def _one_tag(value: str, what: str) -> str:
    tag = " ".join(str(value).split())
    if not tag:
        raise ValueError(f"{what} must not be empty")
    if SEPARATOR in tag:
        raise ValueError(f"{what} {value!r} must be one tag (no '{SEPARATOR}')")
    return tag


def add_trigger(captions: CaptionSet, trigger: str, *, class_word: str = "") -> CaptionSet:
    """Put `trigger` first in every caption (so `keep_tokens=1` keeps it), then `class_word` if given.

    An existing copy (compared case- and whitespace-insensitively) is moved, never duplicated.
    """
    trigger = _one_tag(trigger, "trigger word")
    front = [trigger] + ([_one_tag(class_word, "class word")] if class_word else [])
    keys = {tag_key(t) for t in front}
    return captions.map(lambda tags: front + [t for t in tags if tag_key(t) not in keys])


def add_class_word(captions: CaptionSet, class_word: str, *, trigger: str = "") -> CaptionSet:
    """Put `class_word` right after `trigger` in captions that have it (else first); an existing copy is moved."""
    class_word = _one_tag(class_word, "class word")
    key = tag_key(class_word)
    trigger_key = tag_key(trigger) if trigger else None

    def fn(tags):
        rest = [t for t in tags if tag_key(t) != key]
        at = next((i + 1 for i, t in enumerate(rest) if tag_key(t) == trigger_key), 0) if trigger_key else 0
        return rest[:at] + [class_word] + rest[at:]
    return captions.map(fn)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"bad regular expression {pattern!r}: {e}") from e


def _matcher(tags: Iterable[str], patterns: Iterable[str], regex: bool):
    exact = {tag_key(t) for t in ([tags] if isinstance(tags, str) else tags)}
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if regex:
        compiled = [_compile(p) for p in patterns]
        return lambda tag: tag_key(tag) in exact or any(c.fullmatch(tag) for c in compiled)
    globs = [tag_key(p) for p in patterns]
    return lambda tag: tag_key(tag) in exact or any(fnmatch.fnmatchcase(tag_key(tag), g) for g in globs)


def remove_tags(captions: CaptionSet, tags: Iterable[str] = (), *, patterns: Iterable[str] = (),
                regex: bool = False) -> CaptionSet:
    """Remove tags equal to one of `tags` (case/whitespace-insensitive) or matching one of `patterns`.

    Patterns are globs ("*hair", "blue ?yes"; case-insensitive) or, with `regex=True`, regular
    expressions that must match the whole tag as written (add "(?i)" to ignore case).
    """
    match = _matcher(tags, patterns, regex)
    return captions.map(lambda ts: [t for t in ts if not match(t)])


def replace_tags(captions: CaptionSet, mapping: Mapping[str, str] | None = None, *, pattern: str | None = None,
                 replacement: str | None = None) -> CaptionSet:
    """Replace tags: exactly (`mapping` old -> new, case/whitespace-insensitive) and/or by a regular
    expression matching the whole tag, rewritten with `replacement` (groups as \\1 or \\g<name>).

    A replacement containing commas becomes several tags; an empty one removes the tag. Duplicates
    are kept (see `merge_tags` / `deduplicate_tags`).
    """
    exact = {tag_key(k): v for k, v in (mapping or {}).items()}
    if (pattern is None) != (replacement is None):
        raise ValueError("replace_tags needs both pattern= and replacement= (or neither)")
    compiled = _compile(pattern) if pattern is not None else None

    def fn(tags):
        out: list[str] = []
        for tag in tags:
            if tag_key(tag) in exact:
                tag = exact[tag_key(tag)]
            elif compiled is not None and (m := compiled.fullmatch(tag)):
                try:
                    tag = m.expand(replacement)
                except (re.error, IndexError) as e:
                    raise ValueError(f"bad replacement {replacement!r} for pattern {pattern!r}: {e}") from e
            out += split_tags(tag)
        return out
    return captions.map(fn)


def merge_tags(captions: CaptionSet, sources: Iterable[str], target: str) -> CaptionSet:
    """Merge several tags into one: the first of `sources` (or `target`) in a caption becomes `target`,
    later ones are removed; captions with none of them are unchanged."""
    target = _one_tag(target, "merge target")
    keys = {tag_key(s) for s in ([sources] if isinstance(sources, str) else sources)} | {tag_key(target)}

    def fn(tags):
        out, placed = [], False
        for tag in tags:
            if tag_key(tag) in keys:
                if not placed:
                    out.append(target)
                    placed = True
            else:
                out.append(tag)
        return out
    return captions.map(fn)


def deduplicate_tags(captions: CaptionSet) -> CaptionSet:
    """Drop repeated tags within each caption, keeping the first (compared case/whitespace-insensitively)."""
    def fn(tags):
        seen: set[str] = set()
        out = []
        for tag in tags:
            if tag_key(tag) not in seen:
                seen.add(tag_key(tag))
                out.append(tag)
        return out
    return captions.map(fn)


# Words left out when sentence captions are counted by word: articles, prepositions, conjunctions, pronouns and
# forms of "to be"/"to have", which every sentence has and which say nothing about an image.
STOPWORDS = frozenset("""
a an the and or but nor so yet of on in at to for from by with without into onto over under above below near next
beside behind between among around across along through against about off up down out as than then there here
is are was were be been being am has have had having do does did it its it's this that these those which who whom
whose what where when while his her hers their theirs them they he she him we us our you your i my me one some any
very just also not no can could will would may might shall should must
""".split())

# A comma-separated piece of a caption reads as a sentence (BLIP, Florence, a hand-written description), not as a
# tag (WD14, booru), when it has more than this many words, or when it starts with an article and has 3 or more.
SENTENCE_WORDS = 4
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = "\"'.,;:!?()[]{}“”‘’"
_CLAUSE_BREAK = re.compile(r"[.;:!?]+(?:\s|$)")


class FrequencyTable(list):
    """A list of (term, count), most frequent first, that knows what it counted: `unit` is "tags" (whole
    comma-separated tags, as written) or "words" (words and two-word phrases of sentence captions, stopwords
    left out). Iterates, slices and compares like the plain list of pairs it is."""

    def __init__(self, rows: Iterable[tuple[str, int]] = (), unit: str = "tags") -> None:
        super().__init__(rows)
        self.unit = unit


def _is_sentence(piece: str, only_piece: bool) -> bool:
    words = piece.split()
    if len(words) > SENTENCE_WORDS:
        return True
    if len(words) >= 3 and words[0].casefold() in _ARTICLES:
        return True
    return only_piece and len(words) == SENTENCE_WORDS  # a caption of one four-word piece, no commas at all


def frequency_unit(captions: CaptionSet | Mapping[str, Iterable[str]]) -> str:
    """How `tag_frequency` counts this set: "words" when most of its words lie in sentence-like pieces, else
    "tags". A piece is sentence-like when it has more than SENTENCE_WORDS words, or starts with "a"/"an"/"the"
    and has 3 or more, or is a whole four-word caption without commas, or goes on a sentence after a comma
    (", with green leaves, on a white background"). A trigger tag put before a sentence changes nothing."""
    in_sentences = total = 0
    for tags in captions.values():
        tags = list(tags)
        in_sentence = False
        for tag in tags:
            words = tag.split()
            total += len(words)
            goes_on = in_sentence and bool(words) and words[0].casefold() in STOPWORDS
            in_sentence = goes_on or _is_sentence(tag, len(tags) == 1)
            if in_sentence:
                in_sentences += len(words)
    return "words" if total and in_sentences * 2 > total else "tags"


def _words_and_pairs(piece: str) -> list[str]:
    """The words of one caption piece with stopwords left out, then each pair of neighbouring kept words (no pair
    across a left-out word or a full stop)."""
    out: list[str] = []
    for clause in _CLAUSE_BREAK.split(piece):
        kept: list[str | None] = []
        for raw in clause.split():
            word = raw.strip(_PUNCT)
            if not word or not any(ch.isalnum() for ch in word):
                continue
            kept.append(None if word.casefold() in STOPWORDS else word)
        out += [w for w in kept if w is not None]
        out += [f"{a} {b}" for a, b in zip(kept, kept[1:]) if a is not None and b is not None]
    return out


def _ranked(counts: Counter) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def tag_frequency(captions: CaptionSet, *, by: str = "auto") -> FrequencyTable:
    """(term, number of occurrences in the set), most frequent first, ties alphabetical, as a `FrequencyTable`
    whose `unit` says what was counted.

    `by="tags"` counts whole comma-separated tags as written (WD14/booru captions). `by="words"` counts the words
    and two-word phrases of every caption with STOPWORDS left out, case-insensitively (shown as most often
    written): "a sks flower on a navy background" gives sks, flower, navy, background, "sks flower" and "navy
    background". `by="auto"` picks "words" for sentence captions (BLIP, Florence; see `frequency_unit`) and
    "tags" otherwise. A trigger word is counted either way.
    """
    if by not in ("auto", "tags", "words"):
        raise ValueError(f'by must be "auto", "tags" or "words", got {by!r}')
    unit = frequency_unit(captions) if by == "auto" else by
    if unit == "tags":
        return FrequencyTable(_ranked(Counter(tag for tags in captions.values() for tag in tags)), "tags")
    counts: Counter = Counter()
    spellings: dict[str, Counter] = {}
    for tags in captions.values():
        for tag in tags:
            for term in _words_and_pairs(tag):
                key = term.casefold()
                counts[key] += 1
                spellings.setdefault(key, Counter())[term] += 1
    # Each term shown as most often written; on a tie, in lower case (a capital that starts a sentence loses).
    shown = Counter({max(spellings[key].items(), key=lambda kv: (kv[1], kv[0] == kv[0].lower()))[0]: n
                     for key, n in counts.items()})
    return FrequencyTable(_ranked(shown), "words")


def _check_keep(keep_tokens: int) -> int:
    if int(keep_tokens) < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    return int(keep_tokens)


def sort_by_frequency(captions: CaptionSet, *, keep_tokens: int = 0) -> CaptionSet:
    """Order each caption's tags by their frequency across the set (then alphabetically), leaving the
    first `keep_tokens` tags (trigger, class word) in place."""
    keep = _check_keep(keep_tokens)
    freq = dict(tag_frequency(captions, by="tags"))
    return captions.map(lambda tags: list(tags[:keep]) + sorted(tags[keep:], key=lambda t: (-freq[t], t)))


def limit_tags(captions: CaptionSet, max_tags: int, *, keep_tokens: int = 0) -> CaptionSet:
    """Keep the first `keep_tokens` tags and the first `max_tags` of the tags after them."""
    keep = _check_keep(keep_tokens)
    if int(max_tags) < 0:
        raise ValueError(f"max_tags must be >= 0, got {max_tags}")
    return captions.map(lambda tags: list(tags[:keep]) + list(tags[keep:keep + int(max_tags)]))


def normalize_tags(captions: CaptionSet, *, underscores_to_spaces: bool = False, lowercase: bool = False) -> CaptionSet:
    """Collapse runs of whitespace inside tags to one space and drop empty tags; optionally turn
    underscores into spaces (WD14 "long_hair" -> "long hair"; kaomoji like "^_^" kept) and lowercase."""
    def fn(tags):
        out = []
        for tag in tags:
            tag = " ".join(tag.split())
            if underscores_to_spaces and tag not in KAOMOJI:
                tag = " ".join(tag.replace("_", " ").split())
            if lowercase:
                tag = tag.lower()
            if tag:
                out.append(tag)
        return out
    return captions.map(fn)


# =============================================================================================
# Checks and plots
# =============================================================================================

def count_tokens(text: str, tokenizer) -> int:
    """Number of CLIP tokens of a caption, BOS and EOS included, without truncation."""
    return len(tokenizer(text, truncation=False, add_special_tokens=True, verbose=False)["input_ids"])


def check_token_lengths(captions: CaptionSet, tokenizer, limit: int = 77) -> list[tuple[str, int]]:
    """Captions longer than `limit` CLIP tokens (77 = 75 usable + BOS + EOS): [(image, n_tokens)], by image.

    Training truncates them (unless max_token_length is raised), so their last tags are never seen.
    """
    if int(limit) < 3:
        raise ValueError(f"limit must be >= 3 (BOS + EOS + one token), got {limit}")
    over = []
    for image, tags in captions.items():
        n = count_tokens(join_tags(tags), tokenizer)
        if n > limit:
            over.append((image, n))
    return over


def plot_tag_frequency(captions: CaptionSet | list[tuple[str, int]], path: str | Path, *, top_n: int = 30,
                       title: str | None = None, by: str = "auto") -> Path:
    """Horizontal bar plot PNG of the `top_n` most frequent tags, or words and two-word phrases for sentence
    captions (a set, counted as `tag_frequency(captions, by=by)` does, or a table it returned). The title says
    which: "Tag frequency (by tag)" or "Word frequency (sentence captions, by word and two-word phrase)"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    if int(top_n) < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    table = tag_frequency(captions, by=by) if isinstance(captions, CaptionSet) else captions
    unit = getattr(table, "unit", None)
    if title is None:
        title = {"tags": "Tag frequency (by tag)",
                 "words": "Word frequency (sentence captions, by word and two-word phrase)"}.get(unit, "Tag frequency")
    elif unit is not None:
        title = f"{title} (by {'tag' if unit == 'tags' else 'word and two-word phrase'})"
    empty = "no words" if unit == "words" else "no tags"
    table = list(table)[:int(top_n)]
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.28 * len(table) + 1.0)))
    try:
        labels = [tag for tag, _ in table][::-1]
        counts = [count for _, count in table][::-1]
        ax.barh(range(len(table)), counts, color="#4c72b0")
        ax.set_yticks(range(len(table)), labels)
        ax.set_xlabel("occurrences")
        ax.set_title(title if table else f"{title} ({empty})")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)
