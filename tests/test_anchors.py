"""Anchor generation (frcnn.model.anchors): the reference's nine anchors and their shifting."""

from __future__ import annotations

import torch

from frcnn.model.anchors import AnchorGenerator, generate_anchors, shift_anchors

# The reference generate_anchors.py output (python). Its comment block shows the MATLAB values, all of
# them one larger; those are NOT the right answer.
REFERENCE_ANCHORS = [
    [-84, -40, 99, 55],
    [-176, -88, 191, 103],
    [-360, -184, 375, 199],
    [-56, -56, 71, 71],
    [-120, -120, 135, 135],
    [-248, -248, 263, 263],
    [-36, -80, 51, 95],
    [-80, -168, 95, 183],
    [-168, -344, 183, 359],
]


def test_generate_anchors_reference_values():
    anchors = generate_anchors(16, (0.5, 1, 2), (8, 16, 32))
    assert anchors.dtype == torch.float32
    assert anchors.tolist() == REFERENCE_ANCHORS


def test_generate_anchors_defaults_are_reference():
    assert generate_anchors().tolist() == REFERENCE_ANCHORS


def test_generate_anchors_share_the_base_centre_and_area_grows_with_scale():
    anchors = generate_anchors(16, (0.5, 1, 2), (8, 16, 32)).double()
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.equal(centres, torch.full_like(centres, 7.5))
    w = anchors[:, 2] - anchors[:, 0] + 1
    h = anchors[:, 3] - anchors[:, 1] + 1
    # ratio = h / w, rows ratio-major
    torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3, dtype=h.dtype),
                               rtol=0.05, atol=0)  # widths are rounded: 23x12
    assert (w[[1, 4, 7]] == 2 * w[[0, 3, 6]]).all() and (w[[2, 5, 8]] == 4 * w[[0, 3, 6]]).all()


def test_generate_anchors_other_scales_and_ratios_shape():
    anchors = generate_anchors(16, (1,), (2, 4))
    assert anchors.tolist() == [[-8, -8, 23, 23], [-24, -24, 39, 39]]


def test_shift_anchors_ordering_on_2x2_map():
    base = generate_anchors()
    shifted = shift_anchors(base, 2, 2, 16)
    assert shifted.shape == (2 * 2 * 9, 4)
    assert shifted[9].tolist() == [-68, -40, 115, 55]  # cell (h=0, w=1), anchor 0
    assert shifted[18].tolist() == [-84, -24, 99, 71]  # cell (h=1, w=0), anchor 0
    for h in range(2):
        for w in range(2):
            for a in range(9):
                row = ((h * 2) + w) * 9 + a
                expected = base[a] + torch.tensor([w * 16, h * 16, w * 16, h * 16], dtype=torch.float32)
                assert torch.equal(shifted[row], expected), (h, w, a)


def test_shift_anchors_non_square_map_uses_width_for_x():
    base = generate_anchors()
    shifted = shift_anchors(base, 2, 3, 16)  # H=2, W=3
    row = ((1 * 3) + 2) * 9 + 4  # h=1, w=2, a=4
    assert shifted[row].tolist() == (base[4] + torch.tensor([32.0, 16, 32, 16])).tolist()


def test_anchor_generator_rows_and_cache():
    gen = AnchorGenerator((8, 16, 32), (0.5, 1, 2), stride=16)
    assert gen.num_anchors == 9
    a = gen(38, 50)
    assert a.shape == (38 * 50 * 9, 4)
    assert gen(38, 50) is a  # cached
    assert torch.equal(a, shift_anchors(generate_anchors(), 38, 50, 16))
    b = gen(3, 4)
    assert b.shape == (3 * 4 * 9, 4) and b is not a
    assert gen(38, 50) is a


def test_anchor_generator_buffer_not_in_state_dict():
    gen = AnchorGenerator((8, 16, 32), (0.5, 1, 2))
    assert "base_anchors" not in gen.state_dict()
