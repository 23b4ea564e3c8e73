"""Image pre-processing (frcnn.transforms): scale, resize, normalisation, flip, batching."""

from __future__ import annotations

import pytest
import torch

from frcnn.transforms import batch_images, compute_scale, prep_image

MEANS = (122.7717, 115.9465, 102.9801)


@pytest.mark.parametrize(
    ("h", "w", "expected"),
    [(600, 800, 1.0), (375, 500, 1.6), (500, 375, 1.6), (300, 1000, 1.0), (1000, 300, 1.0),
     (300, 500, 2.0), (300, 600, 1000 / 600), (200, 1000, 1.0), (1200, 1600, 0.5)],
)
def test_compute_scale(h, w, expected):
    assert compute_scale(h, w, 600, 1000) == pytest.approx(expected)


def test_compute_scale_long_side_rounding_as_reference():
    # 600/375 * 626 = 1001.6 -> rounds to 1002 > 1000: capped to 1000/626
    assert compute_scale(375, 626, 600, 1000) == pytest.approx(1000 / 626)
    # 600/599 * 998 = 999.67 -> 1000, not above the cap
    assert compute_scale(599, 998, 600, 1000) == pytest.approx(600 / 599)


def test_prep_image_size_and_scale():
    image = torch.rand(3, 375, 500) * 255
    p = prep_image(image, 600, 1000, MEANS)
    assert p.tensor.shape == (3, 600, 800) and p.size == (600, 800)
    assert p.scale == pytest.approx(1.6) and p.original_size == (375, 500)
    p = prep_image(torch.rand(3, 300, 1000), 600, 1000, MEANS)
    assert p.tensor.shape == (3, 300, 1000) and p.scale == 1.0


def test_prep_image_mean_subtraction_and_std():
    image = torch.stack([torch.full((20, 30), v) for v in (200.0, 100.0, 50.0)])
    p = prep_image(image, 20, 1000, MEANS)  # scale 1: no resize
    for c, v in enumerate((200.0, 100.0, 50.0)):
        torch.testing.assert_close(p.tensor[c], torch.full((20, 30), v - MEANS[c]))
    p = prep_image(image, 40, 1000, MEANS, stds=(2.0, 4.0, 5.0))  # resized: a constant image stays constant
    assert p.tensor.shape == (3, 40, 60)
    for c, (v, s) in enumerate(zip((200.0, 100.0, 50.0), (2.0, 4.0, 5.0))):
        torch.testing.assert_close(p.tensor[c], torch.full((40, 60), (v - MEANS[c]) / s))


def test_prep_image_flip_mirrors_columns():
    image = torch.arange(30.0).view(1, 5, 6).repeat(3, 1, 1)
    plain = prep_image(image, 5, 1000, (0, 0, 0))
    flipped = prep_image(image, 5, 1000, (0, 0, 0), flip=True)
    assert torch.equal(flipped.tensor, plain.tensor.flip(-1))
    assert flipped.tensor[0, 0, 0] == 5.0


def test_prep_image_does_not_modify_input():
    image = torch.rand(3, 10, 12) * 255
    before = image.clone()
    prep_image(image, 20, 1000, MEANS, flip=True)
    assert torch.equal(image, before)


def test_batch_images_pads_bottom_right_with_zeros():
    a = torch.ones(3, 4, 6)
    b = torch.full((3, 5, 3), 2.0)
    batch, sizes = batch_images([a, b])
    assert batch.shape == (2, 3, 5, 6)
    assert sizes.tolist() == [[4, 6], [5, 3]] and sizes.dtype == torch.long
    assert torch.equal(batch[0, :, :4, :6], a) and (batch[0, :, 4:] == 0).all()
    assert torch.equal(batch[1, :, :5, :3], b) and (batch[1, :, :, 3:] == 0).all()


def test_batch_images_size_divisor():
    batch, sizes = batch_images([torch.ones(3, 17, 33), torch.ones(3, 20, 10)], size_divisor=16)
    assert batch.shape == (2, 3, 32, 48)
    assert sizes.tolist() == [[17, 33], [20, 10]]
    batch, _ = batch_images([torch.ones(3, 32, 16)], size_divisor=16)
    assert batch.shape == (1, 3, 32, 16)
