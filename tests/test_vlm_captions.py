"""VLM captioners (Qwen2.5-VL, JoyCaption's LLaVA) on tiny models of the same classes: the prompt template, where
the trigger and class word land, resuming, and freeing the model."""

import weakref

import pytest
import torch

from helpers.data import captions as C
from helpers.data.tagging import caption_folder, load_captioner
from helpers.data.vlm import CaptionTemplate, choose_precision, render
from helpers.toy.photos import photo, write_photos

# A byte-level BPE vocabulary of the printable ASCII bytes (any generation decodes to text), plus each family's
# special tokens.
_VOCAB = {ch: i for i, ch in enumerate(["\u0120", "\u010a"] + [chr(b) for b in range(33, 127)])}
_VOCAB["\u0120a"] = len(_VOCAB)
_MERGES = [("\u0120", "a")]

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Like JoyCaption's Llama 3.1 template: the message is a string and the template puts the image into the first
# user turn itself.
LLAVA_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'user' %}<image>{% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _tokenizer(specials, eos, pad, template):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=dict(_VOCAB), merges=_MERGES, unk_token=None, bos_token=None, eos_token=eos,
                         pad_token=pad)
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos, pad)]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>"], "<|im_end|>", "<|endoftext|>", QWEN_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=None,
                         eos_token_id=ids("<|im_end|>"), pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qwen") / "model"
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipImageProcessor

    tok = _tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>",
                      "<|finetune_right_pad_id|>"], "<|eot_id|>", "<|finetune_right_pad_id|>", LLAVA_TEMPLATE)
    config = LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tok.pad_token_id),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="full", image_seq_length=16)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llava") / "model"
    LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture()
def model_dirs(qwen_dir, llava_dir):
    return {"qwen2_5_vl": qwen_dir, "joycaption": llava_dir}


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "joycaption"])
def test_two_photos_are_captioned_through_the_template(kind, model_dirs):
    captioner = load_captioner(kind, model_dirs[kind], device="cpu", trigger="sks", class_word="woman",
                               length="short", max_new_tokens=6)
    images = [photo("astronaut"), photo("coffee")]
    prompts = captioner.prompts(["", ""])
    expected = {"qwen2_5_vl": 'Call the main subject "sks woman".',
                "joycaption": "you must refer to them as sks."}[kind]
    assert all(expected in p for p in prompts) and "tags" not in prompts[0]
    text = captioner.chat_text(prompts[0])
    assert text.count(captioner.image_token) == 1 and expected in text
    out = captioner.caption(images)
    assert len(out) == 2 and all(c.startswith("sks, woman, ") and len(c) > len("sks, woman, ") for c in out)
    answers = captioner.answers([im.resize((64, 64)) for im in images], prompts)
    assert all(isinstance(a, str) for a in answers)

    custom = load_captioner(kind, model_dirs[kind], device="cpu", trigger="sks", class_word="woman",
                            caption="photo of {trigger} {class}: {caption}", max_new_tokens=4)
    assert all(c.startswith("photo of sks woman: ") for c in custom.caption(images))
    custom.close()
    captioner.close()


def test_tags_fill_the_prompt_and_empty_fields_drop_their_part(qwen_dir):
    class Tagger:
        name = "tags"

        def caption(self, images):
            return ["1girl, smile, short hair"] * len(images)

    captioner = load_captioner("qwen2_5_vl", qwen_dir, device="cpu", tagger=Tagger(), max_new_tokens=3)
    prompt = captioner.prompts(Tagger().caption([None]))[0]
    assert prompt.endswith("These tags describe it: 1girl, smile, short hair.") and "Call the main" not in prompt
    assert render("a[ {trigger}[ {class}]] b", {"trigger": "sks", "class": ""}) == "a sks b"
    assert render("a[ {trigger}[ {class}]] b", {"trigger": "", "class": "dog"}) == "a b"
    with pytest.raises(ValueError, match=r"unknown field\(s\) \{subject\}"):
        CaptionTemplate(prompt="Describe {subject}.")
    with pytest.raises(ValueError, match="must contain {caption}"):
        CaptionTemplate(caption="{trigger}")
    captioner.close()


def test_captioning_writes_each_batch_and_resumes_where_it_stopped(qwen_dir, tmp_path):
    folder = tmp_path / "photos"
    write_photos(folder, ("astronaut", "coffee", "chelsea", "rocket"), with_cutout=False)
    vlm = load_captioner("qwen2_5_vl", qwen_dir, device="cpu", trigger="sks", max_new_tokens=3)

    class Dies:
        name = "dies"

        def __init__(self, fail_at):
            self.calls, self.fail_at = 0, fail_at

        def caption(self, images):
            self.calls += 1
            if self.calls == self.fail_at:
                assert len(list(folder.glob("*.txt"))) == 2       # the first batch is already on disk
                raise KeyboardInterrupt                          # a stopped cell (a disconnect writes nothing more)
            return vlm.caption(images)

    with pytest.raises(KeyboardInterrupt):
        caption_folder(folder, Dies(2), batch_size=2, progress=False)
    done = sorted(p.stem for p in folder.glob("*.txt"))
    assert len(done) == 2
    again = Dies(0)
    result = caption_folder(folder, again, batch_size=2, progress=False)
    assert again.calls == 1 and sorted(result.skipped) == sorted(f"{s}.png" for s in done)
    assert all(C.load_captions(folder).text(i).startswith("sks, ") for i in C.list_images(folder))
    C.undo(folder)
    C.undo(folder)
    assert not list(folder.glob("*.txt"))                        # two runs, two undo steps, nothing left
    vlm.close()


def test_the_model_is_freed_after_captioning(qwen_dir, tmp_path, monkeypatch):
    from helpers.config import TagConfig
    from helpers.data import tagging

    write_photos(tmp_path / "photos", ("astronaut", "coffee"), with_cutout=False)
    loaded = []
    real = tagging.load_captioner

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(tagging, "load_captioner", spy)
    cfg = TagConfig(captioner="qwen2_5_vl", model=str(qwen_dir), trigger="sks", class_word="woman",
                    max_new_tokens=3)
    run = tagging.run_tag_config(tmp_path / "photos", cfg, device="cpu", progress=False)
    assert len(run.captioned) == 2 and all(t[:2] == ("sks", "woman") for t in run.captions.values())
    assert loaded[0].model is None, "run_tag_config keeps the VLM loaded after captioning"


def test_closing_a_captioner_gives_its_memory_back(llava_dir):
    import gc

    captioner = load_captioner("joycaption", llava_dir, device="cpu", max_new_tokens=2)
    ref = weakref.ref(captioner.model)
    captioner.close()
    gc.collect()
    assert ref() is None
    with pytest.raises(RuntimeError, match="was closed"):
        captioner.caption([photo("coffee")])


def test_precision_follows_the_gpu(monkeypatch):
    class Props:
        def __init__(self, gb):
            self.total_memory = int(gb * 1e9)

    def gpu(gb, bf16):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props(gb))

    assert choose_precision("qwen2_5_vl", "cpu", None, "auto", 7.5e9) == (torch.float32, None)
    gpu(15.8, False)                                                 # a T4
    assert choose_precision("qwen2_5_vl", "cuda", None, "auto", 7.5e9) == (torch.float32, "4bit")
    assert choose_precision("joycaption", "cuda", None, "auto", 17e9) == (torch.float16, "4bit")
    gpu(85.0, True)                                                  # an A100 80 GB
    assert choose_precision("joycaption", "cuda", None, "auto", 17e9) == (torch.bfloat16, None)
    gpu(24.0, True)                                                  # an L4
    assert choose_precision("qwen2_5_vl", "cuda", None, "auto", 16.6e9) == (torch.bfloat16, None)
    assert choose_precision("joycaption", "cuda", None, "auto", 17e9) == (torch.bfloat16, None)
    from helpers.data.tagging import CaptionerLoadError

    with pytest.raises(CaptionerLoadError, match="needs a CUDA GPU"):
        choose_precision("joycaption", "cpu", None, "4bit", 17e9)


def test_a_checkpoint_of_another_kind_is_refused(qwen_dir):
    from helpers.data.tagging import CaptionerLoadError

    with pytest.raises(CaptionerLoadError, match="is a 'qwen2_5_vl' model, not joycaption"):
        load_captioner("joycaption", qwen_dir, device="cpu")
