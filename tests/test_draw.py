"""Drawing detections: outline pixels in the class colour, tags placed above (or inside at the top), copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from frcnn.viz.draw import GT_COLOR, PALETTE, class_color, draw_detections

NAMES = ("circle", "square", "star")
GREY = (90, 90, 90)


def grey(width=320, height=240) -> Image.Image:
    return Image.new("RGB", (width, height), GREY)


def test_class_colors_are_fixed_distinct_and_repeat_after_the_palette():
    assert class_color(1) == PALETTE[0] and class_color(2) == PALETTE[1]
    assert len(set(PALETTE)) == len(PALETTE) == 20
    assert class_color(21) == class_color(1)
    with pytest.raises(ValueError):
        class_color(0)


def test_outline_pixels_have_the_class_colour_and_inside_is_untouched():
    image = grey()
    boxes = torch.tensor([[40.0, 60, 120, 200], [180, 80, 300, 150]])
    out = draw_detections(image, boxes, torch.tensor([1, 3]), torch.tensor([0.9, 0.5]), NAMES)
    px = np.asarray(out)
    line = 2  # max(2, round(320 / 320))
    for (x1, y1, x2, y2), label in ((boxes[0], 1), (boxes[1], 3)):
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        ymid, xmid = (y1 + y2) // 2, (x1 + x2) // 2
        colour = class_color(label)
        for x, y in ((x1, ymid), (x1 + line - 1, ymid), (x2, ymid), (x2 - line + 1, ymid), (xmid, y2)):
            assert tuple(px[y, x]) == colour, (x, y)
        assert tuple(px[ymid, x1 + line]) == GREY  # the outline grows inwards by exactly ``line`` pixels
        assert tuple(px[ymid, x1 - 1]) == GREY  # and not outwards
        assert tuple(px[ymid, xmid]) == GREY
    assert tuple(np.asarray(image)[60, 40]) == GREY  # the input is not modified
    assert out is not image and out.size == image.size and out.mode == "RGB"


def test_tag_sits_above_the_box_or_inside_it_at_the_top():
    out = np.asarray(draw_detections(grey(), [[100, 100, 200, 200], [10, 0, 80, 60]], [2, 1], None, NAMES))
    # box 1: a filled tag in the class colour just above its top-left corner, nothing inside the box top
    assert tuple(out[99, 100]) == class_color(2) and tuple(out[90, 100]) == class_color(2)
    assert tuple(out[80, 101]) == GREY  # a tag is about 10 px high at this size
    assert tuple(out[110, 150]) == GREY
    # box 2 touches the top: its tag is inside the box, below y = 0
    inside = out[2:10, 12:40]
    assert (inside == class_color(1)).all(axis=2).mean() > 0.3 and not (inside == GREY).all(axis=2).any()


def test_tag_text_is_drawn_and_scores_widen_it():
    plain = np.asarray(draw_detections(grey(), [[100, 100, 200, 200]], [1], None, NAMES))
    scored = np.asarray(draw_detections(grey(), [[100, 100, 200, 200]], [1], [0.93], NAMES))
    tag = scored[85:100, 100:200]
    white = tag.min(axis=2) > 200  # (anti-aliased) white text on the red tag
    assert white.sum() > 40

    def tag_width(px):
        return int((px[90, :] == class_color(1)).all(axis=1).sum())  # the tag's top (padding) row

    assert tag_width(scored) > tag_width(plain) > 10


def test_tag_stays_inside_the_image_at_the_right_edge():
    out = np.asarray(draw_detections(grey(), [[300, 100, 319, 150]], [1], [0.5], NAMES))
    row = (out[90] == class_color(1)).all(axis=1)
    assert row[319] and row[280] and not row[200]  # the tag (about 50 px wide) is shifted left so it fits


def test_line_width_and_font_grow_with_the_image():
    small = np.asarray(draw_detections(grey(320, 240), [[40, 60, 120, 200]], [1], [0.9], NAMES))
    big = np.asarray(draw_detections(grey(1280, 960), [[40, 60, 120, 200]], [1], [0.9], NAMES))
    assert tuple(small[130, 42]) == GREY
    assert all(tuple(big[130, x]) == class_color(1) for x in range(40, 44))  # round(1280 / 320) = 4
    assert tuple(big[130, 44]) == GREY

    def tag_height(px):
        return int((px[:60, 41] == class_color(1)).all(axis=1).sum())

    assert tag_height(big) > 1.5 * tag_height(small)


def test_gt_boxes_are_white_and_detections_draw_over_them():
    out = np.asarray(draw_detections(grey(), [[40, 60, 120, 200]], [2], [0.9], NAMES,
                                     gt_boxes=np.array([[150, 50, 250, 150], [40, 60, 120, 200]])))
    assert tuple(out[100, 150]) == GT_COLOR and tuple(out[100, 250]) == GT_COLOR
    assert tuple(out[130, 40]) == class_color(2)


def test_higher_scores_are_drawn_on_top_and_inputs_are_flexible():
    boxes = np.array([[50, 50, 150, 150], [50, 50, 150, 150]], dtype=np.float32)
    out = np.asarray(draw_detections(grey(), boxes, np.array([1, 2]), np.array([0.9, 0.4]), NAMES))
    assert tuple(out[100, 50]) == class_color(1)
    out = np.asarray(draw_detections(grey(), boxes.tolist(), [1, 2], [0.4, 0.9], NAMES))
    assert tuple(out[100, 50]) == class_color(2)


def test_empty_detections_and_odd_boxes():
    image = Image.new("L", (64, 48), 90)
    out = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0), NAMES)
    assert out.mode == "RGB" and (np.asarray(out) == 90).all()
    # boxes beyond the image are clipped, non-finite ones skipped, unknown labels still get a tag
    out = draw_detections(grey(), [[-20, -20, 400, 400], [float("nan"), 0, 5, 5]], [7, 1], [0.5, 0.6], NAMES)
    assert tuple(np.asarray(out)[120, 0]) == class_color(7)
    with pytest.raises(ValueError, match="disagree"):
        draw_detections(grey(), [[0, 0, 5, 5]], [1, 2], None, NAMES)
