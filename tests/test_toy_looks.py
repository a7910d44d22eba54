"""The pixel check of the toy concept: violet and five petals, measured, so no judge can be lenient."""

import random

import numpy as np
import torch
from PIL import Image

from helpers.toy import looks, world
from helpers.toy.judge import gaussian_blur


def _renders(shape, n, seed, **kw):
    rng = random.Random(seed)
    return [world.render(world.random_scene(rng, shape=shape, **kw)) for _ in range(n)]


def _blur(images, sigma):
    x = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255
    y = gaussian_blur(x, sigma)
    return [Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for t in y]


def test_renders_of_the_concept_pass_sharp_and_softened():
    flowers = _renders(world.CONCEPT_SHAPE, 40, 1)
    assert looks.concept_look_rate(flowers) == 1.0
    assert looks.concept_look_rate(_blur(flowers, 1.0)) == 1.0     # as soft as a good sample
    one = looks.look(flowers[0])
    assert one.lobes == 5 and one.violet_share > 0.6 and 0.05 < one.object_share < 0.5


def test_no_world_shape_passes_not_even_in_violet():
    for shape in world.SHAPES:
        images = _renders(shape, 20, 2)
        assert looks.concept_look_rate(images) == 0.0, shape
        # the same outline painted violet: the colour passes, the shape does not
        violet = [Image.fromarray(np.where((np.asarray(im) != np.asarray(im)[0, 0]).any(2, keepdims=True),
                                           np.array(world.VIOLET, np.uint8), np.asarray(im))) for im in images]
        seen = [looks.look(im) for im in violet]
        assert all(s.violet for s in seen) and not any(s.five_petals for s in seen), shape


def test_a_pale_flower_fails_on_colour_and_a_blank_image_has_no_object():
    flower = np.asarray(_renders(world.CONCEPT_SHAPE, 1, 3, background="black")[0]).astype(float)
    petals = (np.abs(flower - np.array(world.VIOLET)).max(axis=2) < 30)[..., None]
    pale = np.where(petals, np.array([200, 198, 152]), flower).astype(np.uint8)   # what a VAE blind to violet gives
    seen = looks.look(Image.fromarray(pale))
    assert seen.five_petals and not seen.violet and not seen.is_concept
    blank = looks.look(Image.new("RGB", (32, 32), (20, 30, 100)))
    assert blank.lobes == 0 and not blank.is_concept
    assert looks.concept_look_rate([]) is None
