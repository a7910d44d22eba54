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
