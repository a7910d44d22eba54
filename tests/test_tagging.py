"""Captioners on tiny models saved to disk and loaded through `load_captioner`; `caption_folder` modes and reports."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.data.tagging import (
    CaptionerLoadError, Florence2Captioner, WD14Tagger, caption_folder, find_images, load_captioner,
    resolve_dtype, wd14_preprocess
)

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)


def _images():
    """Three different images, one of them not square."""
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 256, (24, 24, 3), dtype=np.uint8))
    return [Image.new("RGB", (24, 24), RED), Image.new("RGB", (30, 20), BLUE), noise]


# =============================================================================================
# Tiny BLIP
# =============================================================================================

BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "blue", "green",
              "square", "circle", "on", "white", "background", "the", "flower", "sks"]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = tmp_path_factory.mktemp("blip")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(BLIP_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tokenizer)
    config = BlipConfig(
        text_config=dict(vocab_size=len(BLIP_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, bos_token_id=5, sep_token_id=3,
                         pad_token_id=0, encoder_hidden_size=16, initializer_range=0.5),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, initializer_range=0.5),
        projection_dim=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    out = folder / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_blip_captions_images(blip_dir):
    captioner = load_captioner("blip", str(blip_dir), device="cpu", max_new_tokens=6, num_beams=2)
    assert captioner.name == f"blip:{blip_dir}"
    captions = captioner.caption(_images())
    assert len(captions) == 3
    words = set(BLIP_WORDS[6:])
    for caption in captions:
        assert caption and set(caption.split()) <= words  # decoded text, special tokens ([DEC], [SEP]) stripped
    assert len(set(captions)) > 1  # image-dependent
    assert captioner.caption(_images()) == captions  # deterministic (beam search, eval mode)
    assert captioner.caption([]) == []


def test_blip_prompt_is_continued(blip_dir):
    captioner = load_captioner("blip", str(blip_dir), device="cpu", prompt="a photo of", max_new_tokens=4,
                               num_beams=1)
    captions = captioner.caption(_images())
    assert all(c.startswith("a photo of ") and len(c.split()) > 3 for c in captions)


def test_blip_caption_folder_writes_and_skips(blip_dir, tmp_path):
    captioner = load_captioner("blip", str(blip_dir), device="cpu", max_new_tokens=6, num_beams=2)
    images = _images()
    names = ["a.png", "b.jpg", "c.png"]
    for name, image in zip(names, images):
        image.save(tmp_path / name)
    (tmp_path / "c.txt").write_text("my own caption", encoding="utf-8")
    # the captioner sees the images as load_image returns them (the JPEG is lossy: caption it from disk)
    from helpers.data.dataset import load_image

    expected = captioner.caption([load_image(tmp_path / n) for n in names[:2]])

    result = caption_folder(tmp_path, captioner, batch_size=2, mode="skip", progress=False)
    assert dict(result) == {"a.png": expected[0], "b.jpg": expected[1]}
    assert result.skipped == ["c.png"] and result.failed == {}
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == expected[0]
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == expected[1]
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == "my own caption"


# =============================================================================================
# Tiny Florence-2 (transformers' native classes)
# =============================================================================================

@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory):
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    # A byte-level BPE vocabulary with the printable ASCII bytes only (so any generation decodes to ASCII text),
    # a few merges, BART's special tokens, and Florence's <image> token as a named extra special token.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in ["\u0120"] + [chr(b) for b in range(33, 127)]:  # "Ġ" is the byte-level form of a space
        vocab[ch] = len(vocab)
    merges = [("\u0120", "a"), ("r", "e"), ("re", "d"), ("\u0120", "red")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<mask>"] = len(vocab)
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    # the vision tower below downsamples 16x16 pixels by 4: 4x4 patch tokens + 1 pooled token
    image_processor = CLIPImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16},
                                         do_center_crop=False, image_seq_length=17)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    config = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=128, d_model=16,
                         encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
                         encoder_attention_heads=2, decoder_attention_heads=2, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, init_std=0.5),
        vision_config=dict(depths=[1], patch_size=[7], patch_stride=[4], patch_padding=[3], patch_prenorm=[False],
                           embed_dim=[16], num_heads=[1], num_groups=[1], window_size=2, projection_dim=16,
                           drop_path_rate=0.0, initializer_range=0.5),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    out = tmp_path_factory.mktemp("florence2") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("task", ["<CAPTION>", "more_detailed_caption"])
def test_florence2_captions_images(florence_dir, task):
    captioner = load_captioner("florence2", str(florence_dir), device="cpu", task=task, max_new_tokens=8,
                               num_beams=1)
    assert isinstance(captioner, Florence2Captioner) and captioner.task in ("<CAPTION>", "<MORE_DETAILED_CAPTION>")
    captions = captioner.caption(_images())
    assert len(captions) == 3
    for caption in captions:
        assert caption and caption.isascii()
        assert not any(t in caption for t in ("<s>", "</s>", "<pad>", "<image>"))  # post-processed text only
    assert captioner.caption(_images()) == captions


def test_florence2_decodes_padded_batches(florence_dir, monkeypatch):
    """Answers of different lengths come back padded with <pad>: the captions hold the text only."""
    captioner = load_captioner("florence2", str(florence_dir), device="cpu")
    tok = captioner.processor.tokenizer
    short = tok("A red", add_special_tokens=False).input_ids
    long = tok("A red square.", add_special_tokens=False).input_ids
    pad = [tok.pad_token_id] * (len(long) - len(short))
    fake = torch.tensor([[2, 0, *short, 2, *pad], [2, 0, *long, 2]])  # decoder start, <s>, text, </s>, padding
    monkeypatch.setattr(captioner.model, "generate", lambda **kwargs: fake)
    assert captioner.caption(_images()[:2]) == ["A red", "A red square."]
    # a processor saved without the "pure_text" post-processing rule: special tokens are stripped all the same
    monkeypatch.setattr(captioner.processor.post_processor, "parse_task_config", {})
    assert captioner.caption(_images()[:2]) == ["A red", "A red square."]


def test_florence2_caption_folder(florence_dir, tmp_path):
    captioner = load_captioner("florence2", str(florence_dir), device="cpu", max_new_tokens=8, num_beams=2)
    for name, image in zip(["x.png", "y.png", "z.png"], _images()):
        image.save(tmp_path / name)
    expected = captioner.caption(_images())  # PNG is lossless: same pixels as on disk
    result = caption_folder(tmp_path, captioner, batch_size=3, mode="overwrite", progress=False)
    assert dict(result) == dict(zip(["x.png", "y.png", "z.png"], expected))
    for name, text in zip("xyz", expected):
        assert (tmp_path / f"{name}.txt").read_text(encoding="utf-8") == text


def test_florence2_refuses_remote_code_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"},
        "vision_config": {"model_type": "davit"}}), encoding="utf-8")
    with pytest.raises(CaptionerLoadError, match="florence-community/Florence-2-base"):
        load_captioner("florence2", str(tmp_path), device="cpu")


def test_florence2_unknown_task(florence_dir):
    with pytest.raises(ValueError, match="<DETAILED_CAPTION>"):
        load_captioner("florence2", str(florence_dir), device="cpu", task="<OD>")


# =============================================================================================
# Tiny WD14-style ONNX tagger
# =============================================================================================

# (name, category, weights on the mean [B, G, R] of the 0..1 image, bias): logits = x @ W + b, then a sigmoid.
TAGGER_TAGS = [
    ("general", 9, (0, 0, 0), 2.0),           # ratings come first, as in SmilingWolf's files
    ("sensitive", 9, (0, 0, 0), -2.0),
    ("questionable", 9, (0, 0, 0), -3.0),
    ("explicit", 9, (0, 0, 0), -4.0),
    ("red_background", 0, (0, 0, 4), -2.0),   # red 0.881, blue 0.119
    ("blue_background", 0, (4, 0, 0), -2.0),  # blue 0.881
    ("simple_background", 0, (0, 0, 0), 0.5),  # 0.622 for both
    ("no_humans", 0, (0, 0, 0), 1.0),          # 0.731
    ("solo", 0, (0, 0, 0), 3.0),               # 0.953: the blacklist removes it
    (">_<", 0, (0, 0, 3), -1.5),               # kaomoji: red 0.818, its underscore stays
    ("low_score", 0, (0, 0, 0), -1.0),         # 0.269 < 0.35
    ("hatsune_miku", 4, (3, 0, 0), -0.5),      # character: blue 0.924 >= 0.85
    ("kirisame_marisa", 4, (0, 0, 2), -0.3),   # character: red 0.846 (above 0.35, below 0.85)
]
EXPECTED_RED = "red background, >_<, no humans, simple background"
EXPECTED_BLUE = "hatsune miku, blue background, no humans, simple background"


def _write_tagger(folder, size=8):
    import onnx
    from onnx import TensorProto, helper

    weights = np.array([w for _, _, w, _ in TAGGER_TAGS], dtype=np.float32).T / 255.0  # [3, n]: 0..255 input
    bias = np.array([b for _, _, _, b in TAGGER_TAGS], dtype=np.float32)
    n = len(TAGGER_TAGS)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "W"], ["logits0"]),
         helper.make_node("Add", ["logits0", "b"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["output"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.flatten().tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _, _) in enumerate(TAGGER_TAGS):
            writer.writerow([1000 + i, name, category, 100 - i])
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return _write_tagger(tmp_path_factory.mktemp("wd14") / "tagger")


def test_wd14_preprocess_pads_on_white_and_swaps_to_bgr():
    image = Image.new("RGB", (4, 2), RED)  # wide: one white row above and below
    array = wd14_preprocess(image, 4)
    assert array.dtype == np.float32 and array.shape == (4, 4, 3)
    white, red_bgr = [255.0, 255.0, 255.0], [0.0, 0.0, 255.0]
    assert array[0].tolist() == [white] * 4 and array[3].tolist() == [white] * 4
    assert array[1].tolist() == [red_bgr] * 4 and array[2].tolist() == [red_bgr] * 4
    transparent = Image.new("RGBA", (3, 3), (0, 0, 255, 0))  # fully transparent blue is white
    assert wd14_preprocess(transparent, 3).tolist() == [[white] * 3] * 3


def test_wd14_exact_tags(tagger_dir):
    tagger = load_captioner("wd14", str(tagger_dir), device="auto", blacklist=["solo"])
    assert isinstance(tagger, WD14Tagger) and tagger.size == 8  # read from the ONNX input shape
    images = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)]
    assert tagger.caption(images) == [EXPECTED_RED, EXPECTED_BLUE]
    scores = dict(tagger.predict(images)[1])
    assert scores["hatsune miku"] == pytest.approx(1 / (1 + np.exp(-2.5)), abs=1e-5)


def test_wd14_options(tagger_dir):
    red, blue = Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)
    raw = load_captioner("wd14", str(tagger_dir / "model.onnx"), replace_underscores=False, include_rating=True,
                         blacklist="solo, No Humans")  # a file path works; blacklist ignores case and _ vs space
    assert raw.caption([blue]) == ["general, hatsune_miku, blue_background, simple_background"]
    loose = load_captioner("wd14", str(tagger_dir), general_threshold=0.2, character_threshold=0.8)
    assert loose.caption([red]) == ["solo, red background, kirisame marisa, >_<, no humans, simple background, "
                                    "low score"]
    with pytest.raises(ValueError, match="unknown option.*threshold"):
        load_captioner("wd14", str(tagger_dir), threshold=0.5)


def test_caption_folder_modes_and_reports(tagger_dir, tmp_path):
    from helpers.data.captions import history, undo

    tagger = load_captioner("wd14", str(tagger_dir), blacklist=["solo"])
    Image.new("RGB", (16, 16), RED).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), BLUE).save(tmp_path / "blue.png")
    (tmp_path / "10_sks").mkdir()
    Image.new("RGB", (16, 16), BLUE).save(tmp_path / "10_sks" / "blue2.jpg", quality=100)
    (tmp_path / "10_sks" / "blue2.txt").write_text("sks", encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    Image.new("RGB", (16, 16), RED).save(tmp_path / ".hidden.png")
    (tmp_path / "_dropped").mkdir()
    Image.new("RGB", (16, 16), RED).save(tmp_path / "_dropped" / "gone.png")
    assert find_images(tmp_path) == ["10_sks/blue2.jpg", "blue.png", "broken.png", "red.png"]
    assert find_images(tmp_path, recursive=False) == ["blue.png", "broken.png", "red.png"]

    result = caption_folder(tmp_path, tagger, batch_size=2, mode="skip", progress=False)
    assert dict(result) == {"red.png": EXPECTED_RED, "blue.png": EXPECTED_BLUE}
    assert result.skipped == ["10_sks/blue2.jpg"]
    assert list(result.failed) == ["broken.png"] and "Cannot read image" in result.failed["broken.png"]
    assert (tmp_path / "red.txt").read_text(encoding="utf-8") == EXPECTED_RED
    assert (tmp_path / "10_sks" / "blue2.txt").read_text(encoding="utf-8") == "sks"
    assert not (tmp_path / "broken.txt").exists() and not (tmp_path / ".hidden.txt").exists()
    assert not (tmp_path / "_dropped" / "gone.txt").exists()
    assert len(history(tmp_path)) == 1 and result.history == history(tmp_path)[0]

    result = caption_folder(tmp_path, tagger, mode="prepend", progress=False)
    assert result["10_sks/blue2.jpg"] == f"{EXPECTED_BLUE}, sks"
    assert (tmp_path / "red.txt").read_text(encoding="utf-8") == f"{EXPECTED_RED}, {EXPECTED_RED}"
    result = caption_folder(tmp_path, tagger, mode="append", progress=False, recursive=False)
    assert set(result) == {"red.png", "blue.png"}
    assert (tmp_path / "blue.txt").read_text(encoding="utf-8") == ", ".join([EXPECTED_BLUE] * 3)

    undo(tmp_path)
    undo(tmp_path)  # back to before the prepend run
    assert (tmp_path / "10_sks" / "blue2.txt").read_text(encoding="utf-8") == "sks"
    assert (tmp_path / "red.txt").read_text(encoding="utf-8") == EXPECTED_RED


def test_caption_folder_writes_finished_batches_when_interrupted(tmp_path):
    class Flaky:
        name = "flaky"
        calls = 0

        def caption(self, images):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise KeyboardInterrupt
            return [f"color {im.getpixel((0, 0))}" for im in images]

    for i in range(4):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(KeyboardInterrupt):
        caption_folder(tmp_path, Flaky(), batch_size=2, progress=False)
    assert (tmp_path / "0.txt").read_text(encoding="utf-8") == "color (0, 0, 0)"
    assert (tmp_path / "1.txt").read_text(encoding="utf-8") == "color (60, 0, 0)"
    assert not (tmp_path / "2.txt").exists()


def test_caption_folder_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        caption_folder(tmp_path, object(), mode="replace")
    with pytest.raises(ValueError, match="No images"):
        caption_folder(tmp_path, object())


# =============================================================================================
# Errors a user can act on
# =============================================================================================

def test_missing_onnxruntime_says_what_to_install(tagger_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(CaptionerLoadError, match=r"pip install onnxruntime.*onnxruntime-gpu"):
        load_captioner("wd14", str(tagger_dir))


@pytest.mark.parametrize("kind", ["wd14", "blip", "florence2"])
def test_offline_hub_id_says_how_to_pass_a_folder(kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaptionerLoadError) as info:
        load_captioner(kind, "helpers-test/not-in-the-cache")
    message = str(info.value)
    assert "offline" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download helpers-test/not-in-the-cache" in message and "pass its path" in message


def test_bad_sources_and_kinds(tmp_path):
    with pytest.raises(CaptionerLoadError, match="does not exist"):
        load_captioner("blip", str(tmp_path / "nowhere" / "model"))
    with pytest.raises(CaptionerLoadError, match="model.onnx"):
        load_captioner("wd14", str(tmp_path))
    with pytest.raises(CaptionerLoadError, match="no config.json"):
        load_captioner("blip", str(tmp_path))
    with pytest.raises(ValueError, match="blip, florence2, wd14"):
        load_captioner("clip-interrogator")


def test_default_dtypes():
    assert resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16


@pytest.mark.parametrize("kind", ["blip", "florence2"])
def test_half_precision_model_captions(kind, blip_dir, florence_dir):
    """`dtype` reaches the model and a half-precision model captions (bf16 on the CPU stands in for fp16 on CUDA)."""
    folder = blip_dir if kind == "blip" else florence_dir
    captioner = load_captioner(kind, str(folder), device="cpu", dtype="bf16", max_new_tokens=4, num_beams=1)
    assert next(captioner.model.parameters()).dtype == torch.bfloat16
    assert all(isinstance(c, str) for c in captioner.caption(_images()))
