"""Pillow charts (frcnn.viz.charts): colour map ends, heat map cells, charts that survive empty or odd data."""

from __future__ import annotations

import math

import numpy as np

from frcnn.viz import charts


def test_colormap_runs_from_viridis_dark_to_yellow_and_clips():
    c = charts.colormap(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, math.nan]))
    assert tuple(c[1]) == (68, 1, 84) and tuple(c[3]) == (253, 231, 37)
    assert tuple(c[0]) == tuple(c[1]) and tuple(c[4]) == tuple(c[3]) and tuple(c[5]) == tuple(c[1])
    assert tuple(charts.colormap(np.array([0.3]), 0.3, 0.3)[0]) == (68, 1, 84)  # a flat range does not divide by 0


def test_heatmap_cells_are_cell_pixels_of_the_value_colour():
    im = np.asarray(charts.heatmap(np.array([[0.0, 1.0], [1.0, 0.0]]), cell=5))
    assert im.shape == (10, 10, 3)
    assert tuple(im[0, 0]) == (68, 1, 84) and tuple(im[4, 9]) == (253, 231, 37) and tuple(im[9, 4]) == (253, 231, 37)


def test_bar_and_line_charts_draw_any_data():
    bars = charts.bar_chart([("head", 12.5), ("rpn", 0.0), ("nan", math.nan)], unit="ms", title="t")
    assert bars.width == 720 and bars.height > 60
    lines = charts.line_chart([("a", [1, 2, 3], [3.0, math.nan, 1.0], (255, 0, 0)), ("b", [], [], (0, 0, 255))],
                              title="loss", xlabel="iteration", ylabel="loss")
    assert lines.width == 640 and np.asarray(lines).std() > 0
    flat = charts.line_chart([("one point", [5], [0.5], (0, 0, 0))], x_range=(0, 1), y_range=(0, 1))
    assert flat.size[0] == 640


def test_legend_wraps_rows_to_the_width():
    one = charts.legend([("circle", (255, 0, 0))], 400)
    many = charts.legend([(f"class number {i}", (0, 0, 0)) for i in range(12)], 400)
    assert many.width == one.width == 400 and many.height > 2 * one.height
