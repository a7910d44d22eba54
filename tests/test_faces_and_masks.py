"""Real photos (scikit-image's shipped ones) through face detection, face crops, subject coverage and loss masks."""

import numpy as np
import pytest
from PIL import Image

from helpers.config import PrepareConfig
from helpers.data.crops import face_plan, plan_crop, subject_plan
from helpers.data.faces import FaceBox, detect_faces, face_coverage
from helpers.data.prepare import prepare
from helpers.toy.photos import cutout, photo

# Eileen Collins' face in scikit-image's `astronaut` (512x512), checked by eye on a 3x zoom with a 20 px grid:
# from the forehead under the fringe to the chin, cheek to cheek (hair and ears left out).
ASTRONAUT_FACE = FaceBox(178, 78, 272, 178)


@pytest.fixture(scope="module")
def astronaut_face():
    return detect_faces(photo("astronaut"))[0]


def test_the_astronaut_face_is_found(astronaut_face):
    assert astronaut_face.iou(ASTRONAUT_FACE) >= 0.5
    assert 70 <= astronaut_face.width <= 130     # a face, not the whole portrait


@pytest.mark.parametrize("name", ["coffee", "rocket"])
def test_photos_without_a_face_use_the_saliency_crop(name, tmp_path):
    image = photo(name)
    assert detect_faces(image) == []
    (tmp_path / "src").mkdir()
    image.save(tmp_path / "src" / f"{name}.png")
    report = prepare(tmp_path / "src", tmp_path / "out", resolution=256, crop="face", progress=False)
    rec = report.items[0]
    assert rec.faces == 0 and rec.face_box is None and rec.face_coverage is None
    assert "no_face" in rec.flags and "small_face" not in rec.flags
    expected = subject_plan(image, rec.prepared_size).apply(image)
    with Image.open(tmp_path / "out" / rec.prepared) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))
    assert "faces: none found (crop=\"face\" placed every crop by saliency)" in report.summary()


def test_coverage_is_the_face_area_over_the_crop(astronaut_face, tmp_path):
    (tmp_path / "src").mkdir()
    photo("astronaut").save(tmp_path / "src" / "astronaut.png")
    report = prepare(tmp_path / "src", tmp_path / "out", resolution=256, crop="bucket", progress=False)
    rec = report.items[0]
    # bucket 256x256 of a 512x512 photo: scaled by 1/2, nothing cut off, so the box halves
    assert rec.prepared_size == (256, 256)
    by_hand = (astronaut_face.width / 2) * (astronaut_face.height / 2) / (256 * 256)
    assert rec.face_coverage == pytest.approx(by_hand, abs=1e-4)
    assert rec.face_box == pytest.approx([v / 2 for v in (astronaut_face.x0, astronaut_face.y0,
                                                          astronaut_face.x1, astronaut_face.y1)], abs=0.06)
    assert rec.faces >= 1 and "small_face" in rec.flags         # about 4% of the frame, under 1/4
    assert "WARNING: the face fills under 25% of the crop in 1 image(s)" in report.summary()
    assert face_coverage(FaceBox(-10, -10, 50, 50), (100, 100)) == pytest.approx(0.25)   # the part inside counts


@pytest.mark.parametrize("bucket", [(256, 256), (192, 320), (320, 192)])
def test_the_face_crop_keeps_the_whole_face_at_three_aspect_ratios(astronaut_face, bucket):
    plan = face_plan((512, 512), astronaut_face, bucket, margin=0.5, allow_upscale=False)
    assert plan.size == bucket
    face = plan.map_box(astronaut_face)
    assert face.inside(*bucket)
    # centred on the face unless the photo's edge is in the way, and never zoomed past the photo's pixels
    assert plan.resize[0] >= bucket[0] and plan.resize[0] <= 512
    centre = plan.map_box(ASTRONAUT_FACE).centre
    assert abs(centre[0] - bucket[0] / 2) < 0.2 * bucket[0]
    bucket_crop = plan_crop(photo("astronaut"), PrepareConfig(resolution=256, crop="bucket"), [bucket])[0]
    assert face_coverage(face, bucket) > face_coverage(bucket_crop.map_box(astronaut_face), bucket)


def test_prepare_face_crops_portrait_and_landscape_photos(tmp_path):
    full = photo("astronaut")
    src = tmp_path / "src"
    src.mkdir()
    full.save(src / "square.png")
    full.crop((96, 0, 416, 512)).save(src / "portrait.png")      # 320x512, face inside
    full.crop((0, 40, 512, 360)).save(src / "landscape.png")     # 512x320
    report = prepare(src, tmp_path / "out", resolution=256, min_bucket_reso=128, crop="face", progress=False)
    sizes = set()
    for rec in report.items:
        assert rec.face_box is not None, rec.name
        assert FaceBox.from_list(rec.face_box).inside(*rec.prepared_size), rec.name
        sizes.add(rec.prepared_size[0] / rec.prepared_size[1] > 1 and "wide" or
                  rec.prepared_size[0] == rec.prepared_size[1] and "square" or "tall")
    assert sizes == {"wide", "square", "tall"}
    sheet = Image.open(report.contact_sheets[0]).convert("RGB")
    red = np.asarray(sheet).astype(int)
    assert ((red[..., 0] > 200) & (red[..., 1] < 60) & (red[..., 2] < 60)).sum() > 100   # the boxes are drawn


def test_the_face_window_moves_inside_the_photo_instead_of_shrinking():
    corner = FaceBox(0, 0, 60, 60)          # a face in the top-left corner of a 400x300 photo
    plan = face_plan((400, 300), corner, (128, 128), margin=0.5, allow_upscale=False)
    assert plan.box[:2] == (0, 0) and plan.map_box(corner).inside(128, 128)


def test_alpha_becomes_the_mask_exactly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = cutout("chelsea").resize((256, 256))       # already the bucket's size: nothing resampled
    rgba.save(src / "cat.png")
    report = prepare(src, tmp_path / "out", resolution=256, masks="alpha", progress=False)
    rec = report.items[0]
    assert rec.mask == "_masks/cat.png" and report.mask_sheet.is_file()
    with Image.open(tmp_path / "out" / rec.mask) as m:
        assert m.mode == "L" and np.array_equal(np.asarray(m), np.asarray(rgba.getchannel("A")))


def test_face_masks_and_images_without_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo("astronaut").save(src / "astronaut.png")
    photo("coffee").save(src / "coffee.png")
    report = prepare(src, tmp_path / "out", resolution=256, masks="face", progress=False)
    by_name = {r.name: r for r in report.items}
    assert by_name["coffee.png"].mask == "" and "no_mask" in by_name["coffee.png"].flags
    rec = by_name["astronaut.png"]
    with Image.open(tmp_path / "out" / rec.mask) as m:
        mask = np.asarray(m)
    cx, cy = (int(v) for v in FaceBox.from_list(rec.face_box).centre)
    assert mask.shape == (256, 256) and mask[cy, cx] == 255 and mask[0, 0] == 0 and mask[-1, -1] == 0
    assert "masks (face): 1 of 2 images have one" in report.summary()


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory):
    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    from helpers.toy.tiny import write_clip_tokenizer

    root = tmp_path_factory.mktemp("clipseg")
    write_clip_tokenizer(root / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
    processor = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, extract_layers=[0, 1], reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, conditional_layer=0)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).eval().save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root / "model"


def test_clipseg_masks_have_the_image_size_and_land_in_the_manifest(clipseg_dir, tmp_path):
    import weakref

    from helpers.data.masking import load_clipseg, make_masks, mask_sheet
    from helpers.data.records import load_manifest
    from helpers.toy.photos import write_photos

    write_photos(tmp_path / "src", ("astronaut", "coffee"), with_cutout=False)
    prepare(tmp_path / "src", tmp_path / "out", resolution=256, progress=False)
    seg = load_clipseg(str(clipseg_dir), device="cpu")
    probs = seg.probabilities([photo("coffee")], "a cup")
    assert probs[0].shape == (400, 600) and 0.0 <= probs[0].min() <= probs[0].max() <= 1.0
    result = make_masks(tmp_path / "out", "clipseg", prompt="a cup", clipseg=seg, threshold=0.5, progress=False)
    files = {r["prepared"]: r for r in load_manifest(tmp_path / "out")["files"] if r["kind"] == "image"}
    assert set(result.written) | set(result.missing) == set(files)
    for name, rel in result.written.items():
        assert files[name]["mask"] == rel
        with Image.open(tmp_path / "out" / rel) as m:
            assert m.size == tuple(files[name]["prepared_size"])
    assert mask_sheet(tmp_path / "out").is_file()
    ref = weakref.ref(seg.model)
    seg.close()
    assert ref() is None                                            # the model's memory is given back


def test_the_trainer_reads_the_masks_prepare_wrote(tiny_sd15_dir, tmp_path):
    import warnings

    from safetensors import safe_open

    from helpers.config import TrainConfig
    from helpers.data.dataset import load_image_folder
    from helpers.data.masks import mask_source
    from helpers.data.dataset import TrainDataset
    from helpers.train.loop import train

    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(("chelsea", "coffee")):
        c = cutout(name).resize((64, 64))
        c.save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a photo number {i}")
    out = tmp_path / "prepared"
    report = prepare(src, out, resolution=64, min_bucket_reso=64, max_bucket_reso=128, masks="alpha",
                     progress=False)
    assert all(r.mask for r in report.items)
    items = load_image_folder(out)
    ds = TrainDataset(items, resolution=64, enable_bucket=False, mask_source=mask_source(True, False, None, out))
    with Image.open(out / report.items[0].mask) as m:
        expected = np.asarray(m, dtype=np.float32) / 255
    got = ds.example([i.path.name for i in items].index(report.items[0].name), augment=False)["mask"][0].numpy()
    assert np.allclose(got, expected, atol=1e-6)
    cfg = TrainConfig(pretrained_model=str(tiny_sd15_dir), train_data_dir=str(out), resolution=32,
                      max_train_steps=1, train_batch_size=1, masked_loss=True, mixed_precision="no",
                      output_dir=str(tmp_path / "run"), output_name="m")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*have no mask")
        result = train(cfg, progress=False)
    with safe_open(str(result.lora_path), "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"
