"""Bad input on the command line: exit code 2, one line that names the problem, no traceback, and the
user's folders left as they were. One table, every verb."""

import hashlib
import struct
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers.__main__ import main


def _lora_file(path: Path) -> Path:
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(path))
    return path


def _cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_sd15_dir):
    """The bad files a user meets: cut-off downloads, web pages saved as weights, empty files, broken images."""
    d = tmp_path_factory.mktemp("bad")
    good = _lora_file(d / "good.safetensors")
    n = struct.unpack("<Q", good.read_bytes()[:8])[0]
    _cut(_lora_file(d / "cut_lora.safetensors"), 8 + n + 100)            # header intact, tensor data cut
    _cut(_lora_file(d / "cut_header.safetensors"), 40)                   # cut inside the header
    (d / "page.safetensors").write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    (d / "empty.safetensors").write_bytes(b"")
    save_file({"emb_params": torch.zeros(1, 32)}, str(d / "emb.safetensors"))
    _cut(d / "emb.safetensors", 60)
    ckpt = d / "cut_model.safetensors"  # an SD 1.x single file whose download stopped
    save_file({"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(8, 8),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 768)},
              str(ckpt))
    _cut(ckpt, ckpt.stat().st_size - 1000)
    import shutil

    shutil.copytree(tiny_sd15_dir, d / "cut_folder")  # a diffusers folder whose UNet copy stopped halfway
    weights = d / "cut_folder" / "unet" / "diffusion_pytorch_model.safetensors"
    _cut(weights, weights.stat().st_size // 2)
    (d / "bad.toml").write_text('rank = "abc\n')
    (d / "typo.toml").write_text("rnak = 4\n")
    unreadable = d / "unreadable"
    unreadable.mkdir()
    for i in range(3):
        (unreadable / f"img_{i}.png").write_text("not an image")
        (unreadable / f"img_{i}.txt").write_text("sks flower")
    state = d / "out" / "states" / "t-step000002"
    state.mkdir(parents=True)
    (state / "state.json").write_text('{"format": "helpers-train-state", "version": 1, "step": 2, "epoch": 0, '
                                      '"batch_in_epoch": 2}')
    (state / "trainable.safetensors").write_bytes(b"\x00" * 3)
    return d


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = [
    # (verb, arguments; {d} is the corpus folder, {m} the tiny model, {x} a folder of 2 good images), message
    ("generate", "--model {m} --prompt a --lora {d}/cut_lora.safetensors", "is cut off"),
    ("generate", "--model {m} --prompt a --lora {d}/cut_header.safetensors", "cut off or damaged"),
    ("generate", "--model {m} --prompt a --lora {d}/page.safetensors", "web page"),
    ("generate", "--model {m} --prompt a --lora {d}/empty.safetensors", "is empty (0 bytes)"),
    ("generate", "--model {m} --prompt a --lora {d}/good.safetensors:abc", "LoRA weight in"),
    ("generate", "--model {m} --prompt a --lora {d}/missing.safetensors", "LoRA file not found"),
    ("generate", "--model {m} --prompt a --embedding {d}/emb.safetensors", "embedding file"),
    ("generate", "--model {d}/cut_model.safetensors --prompt a", "is cut off"),
    ("generate", "--model {d}/page.safetensors --prompt a", "web page"),
    ("generate", "--model {d}/cut_folder --prompt a", "unet weights"),
    ("generate", "--model {m} --prompt a --sampler Eulerish", "sampler"),
    ("generate", "--prompt a", "needs --model"),
    ("train", "--pretrained-model {m} --train-data-dir {d}/unreadable --output-dir {o}",
     "none of the 3 images"),
    ("train", "--pretrained-model {m} --train-data-dir {d}/no_such_folder --output-dir {o}", "is not a folder"),
    ("train", "--pretrained-model {m} --train-data-dir {x} --rank 0 --output-dir {o}", "rank"),
    ("train", "--pretrained-model {m} --train-data-dir {x} --output-dir {d}/out --output-name t --resume "
     "{d}/out/states/t-step000002", "training state"),
    ("train", "--pretrained-model {d}/cut_model.safetensors --train-data-dir {x} --output-dir {o}", "is cut off"),
    ("train", "--pretrained-model {m} --train-data-dir {x} --vae {d}/cut_lora.safetensors --output-dir {o}",
     "VAE file"),
    ("train", "--config {d}/bad.toml", "is not valid TOML"),
    ("train", "--config {d}/typo.toml", "unknown setting(s): rnak"),
    ("train", "--family sd3", "invalid choice: 'sd3'"),
    ("prepare", "--source {d}/no_such_folder --output-dir {o}", "no_such_folder"),
    ("prepare", "--source {x} --output-dir {x}/prepared", "is inside the source folder"),
    ("tag", "{d}/no_such_folder", "no such folder"),
    ("tag", "{x} --replace foo", "replace entries must read OLD=NEW"),
    ("tag", "{x} --max-tags -1", "max_tags must be an integer >= 0"),
    ("tag", "{x} --captioner wd14 --model {d}/no_such_model", "does not exist"),
    ("tag", "{x} --captioner florence2", "Cannot load"),
    ("evaluate", "--model x", "needs --model and at least one --prompt"),
    ("evaluate", "--model {m} --prompt 'a sks dog' --lora {d}/missing.safetensors", "does not exist"),
    ("evaluate", "--model {m} --prompt 'a dog' --trigger sks", "missing from concept prompt"),
    ("evaluate", "--model {m} --prompt 'a sks dog' --clip-model openai/clip-vit-base-patch32", "Cannot load the CLIP"),
    ("demo", "--steps 0", "must be at least 1"),
]


@pytest.mark.parametrize("verb,args,message", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(verb, args, message, corpus, tiny_sd15_dir, tmp_path,
                                                             capsys):
    import shlex

    good = tmp_path / "good_images"
    good.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (150, 60, 220)).save(good / f"a{i}.png")
        (good / f"a{i}.txt").write_text("sks flower")
    out = tmp_path / "out"
    before = _tree(corpus), _tree(good)
    argv = [verb] + shlex.split(args.format(d=corpus, m=tiny_sd15_dir, x=good, o=out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv + (["--no-progress"] if verb in ("train", "prepare", "tag", "evaluate") else []))
        except SystemExit as e:  # argparse: a flag's value is refused before the command runs
            code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "error: " in err[-1] and message in err[-1], err[-1]
    assert (_tree(corpus), _tree(good)) == before           # the user's files are as they were
    assert not out.exists() or not [p for p in out.rglob("*") if p.suffix in (".safetensors", ".png")]
