"""Class images for DreamBooth prior preservation: top up a folder to n images of the class prompt.

Image i is always `class_{i:05d}.png` made with seed `seed + i`, so an interrupted run resumes
where it stopped. Image i is always generated in the same batch (block i // batch_size, generated
whole), so a resumed folder is bit-identical to one made in a single run with the same batch_size:
batched matmuls round differently for other batch shapes (about 1/255 on a few pixels).
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_text
from ..data.decode import IMAGE_EXTENSIONS

CLASS_IMAGE_NAME = "class_{:05d}.png"


def _existing_images(folder: Path) -> list[Path]:
    """Images directly in `folder` (hidden files skipped): these count towards n, whoever made them."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _missing_indices(folder: Path, n: int) -> list[int]:
    """Indices i whose `class_{i:05d}.png` is absent, lowest first, enough to bring the folder to n images."""
    need = n - len(_existing_images(folder))
    out: list[int] = []
    i = 0
    while len(out) < need:
        if not (folder / CLASS_IMAGE_NAME.format(i)).exists():
            out.append(i)
        i += 1
    return out


def _blocks(indices: list[int], batch_size: int) -> list[int]:
    """The batch blocks (block k = indices k*batch_size .. (k+1)*batch_size-1) holding these indices."""
    return sorted({i // batch_size for i in indices})


def generate_class_images(pipe, class_prompt: str, out_dir: str | Path, n: int, *, negative_prompt: str = "",
                          steps: int = 30, cfg_scale: float = 7.0, sampler: str | None = "Euler a", seed: int = 0,
                          batch_size: int = 4, progress: bool = True, family: str | None = None) -> list[Path]:
    """Make sure `out_dir` holds at least `n` class images of `class_prompt`, generating only the missing ones.

    Images already in `out_dir` (any name) count; new image i is `class_{i:05d}.png` from seed `seed + i`,
    with an A1111 `parameters` chunk and a `.txt` caption holding the prompt. Returns the new images' paths.
    Batches are whole aligned blocks of `batch_size` indices, so a partial block costs a few unused images.
    """
    from tqdm.auto import tqdm

    from ..sd.samplers import SAMPLERS
    from ..generate.inference import generate, quiet_pipeline
    from ..formats.png_info import save_png

    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n (number of class images) must be an integer, got {n!r}")
    if n < 0:
        raise ValueError(f"n (number of class images) must be >= 0, got {n}")
    if not isinstance(class_prompt, str) or not class_prompt.strip():
        raise ValueError("class_prompt must not be empty: give the class the concept belongs to, e.g. 'a photo of a dog'")
    class_prompt = " ".join(class_prompt.split())
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; give a folder for the class images")
    out_dir.mkdir(parents=True, exist_ok=True)

    # A class image of ours whose caption was lost (interrupted run) gets it back.
    for i in range(n):
        image = out_dir / CLASS_IMAGE_NAME.format(i)
        if image.is_file() and not image.with_suffix(".txt").is_file():
            write_text(image.with_suffix(".txt"), class_prompt)

    todo = _missing_indices(out_dir, n)
    if not todo:
        return []
    new: list[Path] = []
    # one bar for the whole job instead of one per batch
    with quiet_pipeline(pipe), tqdm(total=len(todo), desc="class images", unit="img", disable=not progress) as bar:
        wanted = set(todo)
        for block in _blocks(todo, batch_size):
            first = block * batch_size
            # Always the whole block, so image i comes out of the same batch as in any other run.
            images, params = generate(pipe, class_prompt, negative_prompt=negative_prompt, steps=int(steps),
                                      cfg_scale=float(cfg_scale), seed=int(seed) + first, sampler=sampler,
                                      num_images=batch_size, family=family)
            for i, image, text in zip(range(first, first + batch_size), images, params):
                if i not in wanted:
                    continue  # already on disk, or beyond n
                path = out_dir / CLASS_IMAGE_NAME.format(i)
                # Caption first: a run killed between the two leaves no image, so it is redone.
                write_text(path.with_suffix(".txt"), class_prompt)
                save_png(image, path, text)
                new.append(path)
                bar.update(1)
    return new
