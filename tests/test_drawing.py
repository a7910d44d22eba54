"""Thumbnails and sheets that the notebooks, the prepare report and the evaluation report draw."""

from PIL import Image

from helpers.drawing import contact_grid, fit_thumbnail, thumbnail_sheet


def test_fit_thumbnail_shrinks_smoothly_and_enlarges_by_whole_factors():
    big = fit_thumbnail(Image.new("RGB", (400, 200), (10, 20, 30)), 160)
    assert big.size == (160, 80)
    toy = Image.new("RGB", (32, 32), (0, 0, 0))
    toy.putpixel((0, 0), (255, 255, 255))
    up = fit_thumbnail(toy, 160)
    assert up.size == (160, 160)  # 5x, hard pixels: the 5x5 corner block is the one white pixel
    assert up.getpixel((4, 4)) == (255, 255, 255) and up.getpixel((5, 5)) == (0, 0, 0)
    assert fit_thumbnail(Image.new("RGB", (100, 90)), 160).size == (100, 90)  # under 2x: left as it is


def test_contact_grid_lays_out_rows_of_columns_with_file_names(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"img_{i}.png")
        Image.new("RGB", (64, 48), (40 * i, 0, 0)).save(paths[-1])
    two_rows = contact_grid(paths, columns=3, cell=100)
    one_row = contact_grid(paths[:3], columns=3, cell=100)
    assert two_rows.width == one_row.width and two_rows.height > one_row.height
    assert two_rows.size == thumbnail_sheet([(Image.open(p), [p.name]) for p in paths], columns=3, cell=100).size


def _pixels(seed: int, size: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_fit_thumbnail_enlarges_32px_by_3_in_a_100px_cell_exactly():
    import numpy as np

    src = _pixels(0, 32)
    up = fit_thumbnail(Image.fromarray(src), 100)
    assert up.size == (96, 96)  # 100 // 32 = 3, the largest whole factor that fits
    assert np.array_equal(np.asarray(up), src.repeat(3, axis=0).repeat(3, axis=1))  # each pixel a 3x3 block


def test_thumbnail_sheet_enlarges_small_images_with_hard_pixels_and_shrinks_large_ones_smoothly():
    import numpy as np

    pad, cell = 6, 100  # thumbnail_sheet's padding; the image is centred in its cell
    src = _pixels(1, 32)
    sheet = np.asarray(thumbnail_sheet([(Image.fromarray(src), ["toy.png"])], cell=cell))
    off = pad + (cell - 96) // 2
    block = sheet[off:off + 96, off:off + 96]
    assert np.array_equal(block, src.repeat(3, axis=0).repeat(3, axis=1))
    assert (sheet[off - 1, off:off + 96] == 250).all() and (sheet[off + 96, off:off + 96] == 250).all()  # 96, not more

    big = Image.fromarray(_pixels(2, 300))
    want = big.copy()
    want.thumbnail((cell, cell), Image.Resampling.LANCZOS)  # as it was drawn before: LANCZOS down to the cell
    assert want.size == (100, 100)
    sheet = np.asarray(thumbnail_sheet([(big, ["photo.png"])], cell=cell))
    assert np.array_equal(sheet[pad:pad + 100, pad:pad + 100], np.asarray(want))


def test_contact_grid_shows_toy_images_enlarged(tmp_path):
    import numpy as np

    src = _pixels(3, 32)
    Image.fromarray(src).save(tmp_path / "toy.png")
    sheet = np.asarray(contact_grid([tmp_path / "toy.png"], cell=100))
    off = 6 + 2
    assert np.array_equal(sheet[off:off + 96, off:off + 96], src.repeat(3, axis=0).repeat(3, axis=1))


def test_prepare_contact_sheet_enlarges_32px_images(tmp_path):
    import numpy as np

    from helpers.data.records import FileRecord
    from helpers.data.sheets import write_contact_sheets

    src = _pixels(4, 32)
    rec = FileRecord(source="toy.png", prepared="toy.png", prepared_size=(32, 32))
    [path] = write_contact_sheets(tmp_path, [rec], {rec.name: Image.fromarray(src)}, tmp_path, fsync=False)
    with Image.open(path) as im:
        sheet = np.asarray(im.convert("RGB"))
    off, title_h = 6, 24  # 160 // 32 = 5: the 160x160 thumbnail fills its cell
    block = sheet[title_h + off:title_h + off + 160, off:off + 160]
    assert np.array_equal(block, src.repeat(5, axis=0).repeat(5, axis=1))


def test_contact_grid_wraps_a_long_label_instead_of_cutting_it():
    from PIL import Image

    from helpers.drawing import contact_grid

    prompt = "a sks flower on a navy background with a long tail of words"
    short = contact_grid([Image.new("RGB", (32, 32), "red")], ["x"], cell=128)
    long = contact_grid([Image.new("RGB", (32, 32), "red")], [prompt], cell=128)
    assert long.height > short.height   # more lines under the thumbnail, every word kept
