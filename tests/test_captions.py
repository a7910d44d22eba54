"""Tests for helpers.data.captions: loading a set, every tag operation with exact results, saving through the
history, undo restoring byte-equal files, tag frequency and its plot, and CLIP token-length checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers.data.captions import (
    HISTORY_DIR, CaptionReadError, CaptionSet, add_class_word, add_trigger, check_token_lengths, count_tokens,
    deduplicate_tags, frequency_unit, history, limit_tags, list_images, load_captions, merge_tags, normalize_tags,
    plot_tag_frequency, read_history_entry, remove_tags, replace_tags, save_captions, sort_by_frequency,
    split_tags, tag_frequency, undo, write_captions
)

SUB = "10_sks flower"


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (200, 30, 90)).save(path)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Top-level images, a kohya subfolder, an image without caption, and files that must be skipped."""
    root = tmp_path / "set"
    _image(root / "a.png")
    (root / "a.txt").write_bytes(b"1girl, long_hair, smile")
    _image(root / "b.jpg")
    (root / "b.txt").write_bytes(b"\xef\xbb\xbfsks,flower ,  red petals, Flower\n")  # BOM, odd spacing, newline
    _image(root / SUB / "c.png")
    (root / SUB / "c.txt").write_bytes("a photo of a flower in Zürich".encode())
    _image(root / SUB / "d.webp")  # no caption file
    _image(root / "_dropped" / "e.png")
    (root / "_dropped" / "e.txt").write_bytes(b"dropped")
    _image(root / ".hidden.png")
    _image(root / "notes" / "f.png")
    (root / "readme.txt").write_bytes(b"not a caption")
    return root


def _files(root: Path) -> dict[str, bytes]:
    """Every file of the folder outside the history, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and HISTORY_DIR not in p.relative_to(root).parts}


def _set(captions: dict[str, str]) -> CaptionSet:
    return CaptionSet(captions)


# ----------------------------------------------------------------------------- loading

def test_load_captions_follows_dataset_conventions(dataset):
    cs = load_captions(dataset)
    assert list_images(dataset) == ["10_sks flower/c.png", "10_sks flower/d.webp", "a.png", "b.jpg"]
    assert dict(cs) == {
        "10_sks flower/c.png": ("a photo of a flower in Zürich",),
        "10_sks flower/d.webp": (),
        "a.png": ("1girl", "long_hair", "smile"),
        "b.jpg": ("sks", "flower", "red petals", "Flower"),
    }
    assert cs.missing == {"10_sks flower/d.webp"}
    assert cs.text("b.jpg") == "sks, flower, red petals, Flower"
    assert cs.folder == dataset and cs.extension == ".txt"


def test_split_tags_sentence_is_one_tag_and_lines_are_joined():
    assert split_tags("a photo of a dog") == ("a photo of a dog",)
    assert split_tags(" a , ,b\n c ,") == ("a", "b c")
    assert split_tags("") == ()


def test_binary_caption_raises_naming_every_bad_file(dataset):
    (dataset / "a.txt").write_bytes(b"\x00\x01\x02 not text")
    (dataset / SUB / "c.txt").write_bytes(b"\xff\xfe\x00\xd8")  # a UTF-16 BOM, then a broken surrogate
    with pytest.raises(CaptionReadError) as err:
        load_captions(dataset)
    message = str(err.value)
    assert str(dataset / "a.txt") in message and str(dataset / SUB / "c.txt") in message
    assert "binary data" in message and "UTF-16" in message
    assert str(dataset / "b.txt") not in message


def test_latin1_and_cp1252_captions_are_kept_with_a_warning(dataset):
    (dataset / "a.txt").write_bytes("caf\u00e9, cr\u00e8me \u2013 sks".encode("cp1252"))
    (dataset / "b.txt").write_bytes(b"na\xefve, \x81odd")  # Latin-1; 0x81 is undefined in cp1252
    with pytest.warns(UserWarning, match="not valid UTF-8") as caught:
        cs = load_captions(dataset)
    assert cs["a.png"] == ("caf\u00e9", "cr\u00e8me \u2013 sks")
    assert cs["b.jpg"] == ("na\u00efve", "\ufffdodd")
    assert any(str(dataset / "a.txt") in str(w.message) and "cp1252" in str(w.message) for w in caught)


def test_other_caption_extension(dataset):
    (dataset / "a.caption").write_text("x, y", encoding="utf-8")
    cs = load_captions(dataset, extension="caption")
    assert cs["a.png"] == ("x", "y") and cs.extension == ".caption"
    assert cs.missing == {"b.jpg", "10_sks flower/c.png", "10_sks flower/d.webp"}


# ----------------------------------------------------------------------------- operations

def test_add_trigger_goes_first_once_and_moves_existing_copies():
    cs = _set({"a.png": "1girl, smile", "b.png": "flower, SKS, red", "c.png": "sks, dog, sks", "d.png": ""})
    out = add_trigger(cs, "sks")
    assert out.texts() == {"a.png": "sks, 1girl, smile", "b.png": "sks, flower, red", "c.png": "sks, dog",
                           "d.png": "sks"}
    assert cs.text("a.png") == "1girl, smile"  # pure: the input set is unchanged
    with_class = add_trigger(cs, " sks ", class_word="flower")
    assert with_class.texts() == {"a.png": "sks, flower, 1girl, smile", "b.png": "sks, flower, red",
                                  "c.png": "sks, flower, dog", "d.png": "sks, flower"}
    with pytest.raises(ValueError, match="one tag"):
        add_trigger(cs, "sks, flower")
    with pytest.raises(ValueError, match="empty"):
        add_trigger(cs, "  ")


def test_add_class_word_after_trigger():
    cs = _set({"a.png": "sks, red", "b.png": "red, Flower, sks", "c.png": "red"})
    out = add_class_word(cs, "flower", trigger="sks")
    assert out.texts() == {"a.png": "sks, flower, red", "b.png": "red, sks, flower", "c.png": "flower, red"}
    assert add_class_word(cs, "flower").texts()["a.png"] == "flower, sks, red"


def test_remove_tags_exact_glob_and_regex():
    cs = _set({"a.png": "1girl, long_hair, Short Hair, smile, hair ornament",
               "b.png": "red petals, blue petals, Red  Sky, sky"})
    assert remove_tags(cs, ["SMILE", "red sky"]).texts() == {
        "a.png": "1girl, long_hair, Short Hair, hair ornament", "b.png": "red petals, blue petals, sky"}
    assert remove_tags(cs, patterns=["*hair"]).texts() == {
        "a.png": "1girl, smile, hair ornament", "b.png": "red petals, blue petals, Red  Sky, sky"}
    assert remove_tags(cs, patterns="*_hair").texts()["a.png"] == "1girl, Short Hair, smile, hair ornament"
    # regex matches the whole tag as written: case-sensitive unless (?i)
    assert remove_tags(cs, patterns=[r"\w+ petals"], regex=True).texts()["b.png"] == "Red  Sky, sky"
    assert remove_tags(cs, patterns=[r"red .*"], regex=True).texts()["b.png"] == "blue petals, Red  Sky, sky"
    assert remove_tags(cs, patterns=[r"(?i)red .*"], regex=True).texts()["b.png"] == "blue petals, sky"
    assert remove_tags(cs, patterns=[r"hair"], regex=True).texts() == cs.texts()  # fullmatch, not search
    with pytest.raises(ValueError, match="regular expression"):
        remove_tags(cs, patterns=["(unclosed"], regex=True)


def test_replace_tags_exact_and_pattern_with_groups():
    cs = _set({"a.png": "1girl, long_hair, Blue_Eyes, smile", "b.png": "1GIRL, solo"})
    assert replace_tags(cs, {"1girl": "woman", "smile": ""}).texts() == {
        "a.png": "woman, long_hair, Blue_Eyes", "b.png": "woman, solo"}
    assert replace_tags(cs, {"1girl": "woman, solo"}).texts()["b.png"] == "woman, solo, solo"  # duplicates kept
    out = replace_tags(cs, pattern=r"(?i)(\w+)_(hair|eyes)", replacement=r"\2 of \1")
    assert out.texts()["a.png"] == "1girl, hair of long, Eyes of Blue, smile"
    named = replace_tags(cs, pattern=r"(?P<w>\w+)_hair", replacement=r"\g<w> hair")
    assert named.texts()["a.png"] == "1girl, long hair, Blue_Eyes, smile"
    with pytest.raises(ValueError, match="both"):
        replace_tags(cs, pattern=r"(\w+)_hair")
    with pytest.raises(ValueError, match="bad replacement"):
        replace_tags(cs, pattern=r"(\w+)_hair", replacement=r"\3")


def test_merge_tags_puts_target_at_first_occurrence():
    cs = _set({"a.png": "smile, grin, happy, red", "b.png": "red, Happy", "c.png": "red"})
    out = merge_tags(cs, ["smile", "grin"], "happy")
    assert out.texts() == {"a.png": "happy, red", "b.png": "red, happy", "c.png": "red"}


def test_deduplicate_keeps_first_occurrence_normalized():
    cs = _set({"a.png": "Flower, red,  flower , red  petals, Red Petals, red", "b.png": "a, b"})
    assert deduplicate_tags(cs).texts() == {"a.png": "Flower, red, red  petals", "b.png": "a, b"}


def test_sort_by_frequency_keeps_first_tokens_in_place():
    cs = _set({"a.png": "sks, zeta, beta, alpha", "b.png": "sks, beta, alpha", "c.png": "sks, alpha, gamma"})
    # frequency: sks 3, alpha 3, beta 2, gamma 1, zeta 1 (ties alphabetical)
    assert sort_by_frequency(cs).texts() == {"a.png": "alpha, sks, beta, zeta", "b.png": "alpha, sks, beta",
                                             "c.png": "alpha, sks, gamma"}
    assert sort_by_frequency(cs, keep_tokens=1).texts() == {"a.png": "sks, alpha, beta, zeta",
                                                            "b.png": "sks, alpha, beta", "c.png": "sks, alpha, gamma"}
    assert sort_by_frequency(cs, keep_tokens=2).texts()["a.png"] == "sks, zeta, alpha, beta"
    with pytest.raises(ValueError, match="keep_tokens"):
        sort_by_frequency(cs, keep_tokens=-1)


def test_limit_tags_after_keep_tokens():
    cs = _set({"a.png": "sks, flower, t1, t2, t3", "b.png": "sks"})
    assert limit_tags(cs, 2).texts() == {"a.png": "sks, flower", "b.png": "sks"}
    assert limit_tags(cs, 2, keep_tokens=2).texts() == {"a.png": "sks, flower, t1, t2", "b.png": "sks"}
    assert limit_tags(cs, 0, keep_tokens=1).texts() == {"a.png": "sks", "b.png": "sks"}
    with pytest.raises(ValueError, match="max_tags"):
        limit_tags(cs, -1)


def test_normalize_whitespace_underscores_and_kaomoji():
    cs = CaptionSet({"a.png": ("  long   hair ", "blue_eyes", "^_^", "", "Looking_At  _Viewer", ">_<")})
    assert normalize_tags(cs).texts()["a.png"] == "long hair, blue_eyes, ^_^, Looking_At _Viewer, >_<"
    assert normalize_tags(cs, underscores_to_spaces=True).texts()["a.png"] == \
        "long hair, blue eyes, ^_^, Looking At Viewer, >_<"
    assert normalize_tags(cs, underscores_to_spaces=True, lowercase=True).texts()["a.png"] == \
        "long hair, blue eyes, ^_^, looking at viewer, >_<"


# ----------------------------------------------------------------------------- frequency and plot

def test_tag_frequency_exact_counts_and_plot(tmp_path):
    cs = _set({"a.png": "sks, red, flower", "b.png": "sks, flower, flower", "c.png": "sks, blue", "d.png": ""})
    assert tag_frequency(cs) == [("flower", 3), ("sks", 3), ("blue", 1), ("red", 1)]
    png = plot_tag_frequency(cs, tmp_path / "plots" / "freq.png", top_n=2)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["freq.png"]  # no temp file left
    assert plot_tag_frequency([], tmp_path / "empty.png").is_file()
    with pytest.raises(ValueError, match="top_n"):
        plot_tag_frequency(cs, tmp_path / "x.png", top_n=0)


def _sentences() -> CaptionSet:
    colours = ["black", "gray", "navy"] * 8
    return CaptionSet({f"{i:02d}.png": f"a sks flower on a {c} background" for i, c in enumerate(colours)})


def test_tag_frequency_counts_tags_of_tag_captions_exactly():
    cs = CaptionSet({"a.png": "sks, 1girl, long hair, looking at viewer, smile",
                     "b.png": "sks, 1girl, short hair, smile", "c.png": "sks, flower, from behind"})
    table = tag_frequency(cs)
    assert table.unit == "tags" and frequency_unit(cs) == "tags"
    assert table == [("sks", 3), ("1girl", 2), ("smile", 2), ("flower", 1), ("from behind", 1), ("long hair", 1),
                     ("looking at viewer", 1), ("short hair", 1)]


def test_tag_frequency_counts_words_and_two_word_phrases_of_sentence_captions():
    table = tag_frequency(_sentences())
    assert table.unit == "words"
    assert table == [("background", 24), ("flower", 24), ("sks", 24), ("sks flower", 24),
                     ("black", 8), ("black background", 8), ("gray", 8), ("gray background", 8),
                     ("navy", 8), ("navy background", 8)]
    counts = dict(table)
    assert not {word for term in counts for word in term.split()} & {"a", "on"}
    # what a caller of the notebook does: slice, unpack pairs
    assert [(tag, count) for tag, count in tag_frequency(_sentences())[:3]] == table[:3]


def test_tag_frequency_keeps_the_trigger_tag_before_a_sentence_and_follows_sentences_across_commas():
    cs = add_trigger(_sentences(), "sks")  # "sks, a sks flower on a navy background": still sentence captions
    assert frequency_unit(cs) == "words" and dict(tag_frequency(cs))["sks"] == 48
    florence = CaptionSet({"a.png": "The image shows a pink Flower, with green leaves, on a white background.",
                           "b.png": "A pink flower. It sits on a table."})
    assert frequency_unit(florence) == "words"
    assert tag_frequency(florence) == [
        ("flower", 2), ("pink", 2), ("pink flower", 2), ("background", 1), ("green", 1), ("green leaves", 1),
        ("image", 1), ("image shows", 1), ("leaves", 1), ("shows", 1), ("sits", 1), ("table", 1), ("white", 1),
        ("white background", 1)]  # no pair across a full stop or a left-out word; "Flower" shown as written most


def test_tag_frequency_by_overrides_the_choice_and_sort_by_frequency_still_sorts_tags():
    cs = _sentences()
    assert tag_frequency(cs, by="tags") == [("a sks flower on a black background", 8),
                                            ("a sks flower on a gray background", 8),
                                            ("a sks flower on a navy background", 8)]
    tags = CaptionSet({"a.png": "sks, red flower", "b.png": "sks, red flower, leaf"})
    assert tag_frequency(tags, by="words") == [("flower", 2), ("red", 2), ("red flower", 2), ("sks", 2), ("leaf", 1)]
    with pytest.raises(ValueError, match="by must be"):
        tag_frequency(cs, by="letters")
    mixed = add_trigger(cs, "sks")  # counted by word, but sorted by whole tag: the trigger (24) before a sentence (8)
    assert sort_by_frequency(mixed).text("00.png") == "sks, a sks flower on a black background"


def test_plot_tag_frequency_says_how_it_counted(tmp_path, monkeypatch):
    import matplotlib.axes

    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: (titles.append(t), real(ax, t))[1])
    plot_tag_frequency(_sentences(), tmp_path / "words.png", top_n=30)
    plot_tag_frequency(CaptionSet({"a.png": "sks, flower"}), tmp_path / "tags.png")
    plot_tag_frequency(tag_frequency(_sentences()), tmp_path / "table.png", title="Flowers")
    assert titles == ["Word frequency (sentence captions, by word and two-word phrase)", "Tag frequency (by tag)",
                      "Flowers (by word and two-word phrase)"]
    assert all((tmp_path / n).is_file() for n in ("words.png", "tags.png", "table.png"))


# ----------------------------------------------------------------------------- token lengths

def test_check_token_lengths_lists_exactly_the_overlong_captions(tmp_path):
    from helpers.toy.tiny import load_tiny_tokenizer, write_clip_tokenizer

    tok = load_tiny_tokenizer(write_clip_tokenizer(tmp_path / "tok"))
    # Known words are one token, a comma is one, an unknown word is one token per character.
    assert count_tokens("sks, flower", tok) == 5  # BOS sks , flower EOS
    assert count_tokens("zebra", tok) == 7  # BOS z e b r a EOS
    cs = _set({
        "exact77.png": ", ".join(["red"] * 38),  # 38 words + 37 commas + 2 = 77: fits
        "over79.png": ", ".join(["red"] * 39),  # 79
        "long_unknown.png": "sks, " + "x" * 74,  # BOS sks , 74 chars EOS = 78
        "short.png": "a photo of a red flower",  # 8
        "empty.png": "",  # 2
    })
    assert check_token_lengths(cs, tok) == [("long_unknown.png", 78), ("over79.png", 79)]
    assert check_token_lengths(cs, tok, limit=7) == [("exact77.png", 77), ("long_unknown.png", 78),
                                                     ("over79.png", 79), ("short.png", 8)]


# ----------------------------------------------------------------------------- write, save, undo

def test_write_captions_writes_clean_lines_and_snapshots(dataset):
    before = _files(dataset)
    entry = write_captions(dataset, {"a.png": "  new,\r\n caption  ", f"{SUB}/d.webp": "ünïcode"}, note="test")
    assert (dataset / "a.txt").read_bytes() == b"new, caption"
    assert (dataset / SUB / "d.txt").read_bytes() == "ünïcode".encode("utf-8")  # no BOM
    assert history(dataset) == [entry] and entry.parent == dataset / HISTORY_DIR
    manifest = read_history_entry(entry)
    assert manifest["note"] == "test" and manifest["extension"] == ".txt"
    assert manifest["had_caption"] == ["10_sks flower/c.png", "a.png", "b.jpg"]
    assert manifest["no_caption"] == ["10_sks flower/d.webp"]
    assert (entry / "b.txt").read_bytes() == before["b.txt"]
    assert (entry / SUB / "c.txt").read_bytes() == before[f"{SUB}/c.txt"]
    assert not list(dataset.rglob("*.tmp"))


def test_write_captions_refuses_bad_keys(dataset):
    with pytest.raises(FileNotFoundError, match="no image"):
        write_captions(dataset, {"zzz.png": "x"})
    with pytest.raises(ValueError, match="relative"):
        write_captions(dataset, {"../a.png": "x"})
    with pytest.raises(ValueError, match="not an image"):
        write_captions(dataset, {"readme.txt": "x"})
    Image.new("RGB", (2, 2)).save(dataset / "a.jpg")
    with pytest.raises(ValueError, match="share the caption file a.txt"):
        write_captions(dataset, {"a.png": "x", "a.jpg": "y"})
    with pytest.raises(ValueError, match="not inside"):
        write_captions(dataset, {str(dataset.parent / "elsewhere.png"): "x"})
    assert history(dataset) == []  # nothing written, nothing snapshotted


def test_round_trip_load_save_load(dataset):
    cs = load_captions(dataset)
    assert save_captions(cs) is None  # nothing changed: no write, no history entry
    assert history(dataset) == []
    edited = add_trigger(cs, "sks", class_word="flower")
    entry = edited.save(note="trigger")
    assert entry is not None and read_history_entry(entry)["note"] == "trigger"
    again = load_captions(dataset)
    assert again == edited and again.missing == frozenset()
    assert (dataset / "a.txt").read_bytes() == b"sks, flower, 1girl, long_hair, smile"
    assert (dataset / "b.txt").read_bytes() == b"sks, flower, red petals"
    assert (dataset / SUB / "d.txt").read_bytes() == b"sks, flower"
    assert (dataset / "_dropped" / "e.txt").read_bytes() == b"dropped"


def test_save_writes_only_changed_captions(dataset):
    before = _files(dataset)
    cs = load_captions(dataset)
    entry = remove_tags(cs, ["smile"]).save()
    after = _files(dataset)
    assert after["a.txt"] == b"1girl, long_hair"
    assert {k for k in after if after[k] != before.get(k)} == {"a.txt"}  # b.txt keeps its BOM and spacing
    assert "10_sks flower/d.txt" not in after  # an empty caption does not create a file
    assert history(dataset) == [entry]


def test_undo_restores_bytes_and_removes_new_files_twice(dataset):
    original = _files(dataset)
    cs = load_captions(dataset)
    first = add_trigger(cs, "sks").save(note="one")
    after_one = _files(dataset)
    assert after_one[f"{SUB}/d.txt"] == b"sks"
    second = limit_tags(load_captions(dataset), 1).save(note="two")
    assert history(dataset) == [first, second]
    assert second.name.startswith("000002-")
    assert (dataset / "a.txt").read_bytes() == b"sks"

    assert undo(dataset) == second
    assert _files(dataset) == after_one
    assert history(dataset) == [first]
    assert undo(dataset) == first
    assert _files(dataset) == original  # byte-equal, BOM included; d.txt removed again
    assert history(dataset) == []
    with pytest.raises(ValueError, match="nothing to undo"):
        undo(dataset)


def test_history_ignores_unfinished_entries(dataset):
    write_captions(dataset, {"a.png": "x"})
    root = dataset / HISTORY_DIR
    (root / "000002-20250101T000000.123.tmp").mkdir()  # a snapshot interrupted mid-copy
    (root / "notes").mkdir()
    assert [p.name[:6] for p in history(dataset)] == ["000001"]
    nxt = write_captions(dataset, {"a.png": "y"})
    assert nxt.name.startswith("000002-")
    assert json.loads((nxt / "manifest.json").read_text())["had_caption"][1] == "a.png"
