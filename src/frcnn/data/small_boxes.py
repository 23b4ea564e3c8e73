"""Boxes too small for the network's stride at the training scale, and the larger input that helps them.

No anchor set fits a box under twice the (finest) stride: anchors sit a stride apart, so a same-sized anchor is off a
16 px box by up to 4 px in x and y at stride 8 (IoU 0.39). A larger input does. :func:`small_boxes` finds the group
(all the boxes, or one class's) of which at least a quarter is that small at ``TRAIN.SCALES[0]``, and the input that
brings its first quartile to two strides; check-data and ``frcnn train`` print it as a warning
(:func:`small_boxes_hint`). With ``TRAIN.SCALE_UP_LIMIT`` above 0 (scratch-cpu: 2) ``frcnn train`` takes that input
itself (:func:`scale_up`), at most that many times the time of an iteration (about ``(new / old)^2``): training's
and test's ``SCALES`` and ``MAX_SIZE`` grow by one factor, the run's config.yaml holds them (so eval, detect and
export use them) with ``SCALE_UP_LIMIT: 0`` (resolving again changes nothing), and ``ANCHOR_SCALES: auto`` chooses
at the new scale.

Measured (``benchmarks/results/scratch_cpu.md``, scratch-cpu with its test-time counts from the data,
:mod:`frcnn.data.dense`; VOC07 mAP on the test split, 2 seeds): BCCD's pictures tiled 3 x 3
(``benchmarks/make_bccd_tiled.py --grid 3 --repeats 3``; platelets 9 px at 320) 0.668 at 320, 0.823 at 448 (the
limit 2), 0.729 at the 640 asked for: a larger input pays until the tiny network's view of the larger
objects suffers, hence the limit. Tiled 2 x 2 (platelets 13 px) 0.812 at 320, 0.817 at the 448 asked for with
anchors an octave apart, 0.842 with the half-octave ones auto picks there. On
BCCD, the demo's data and BCCD's white-cell crops no group is that small: nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from frcnn.config import Config
from frcnn.data.anchor_fit import AnchorFit, anchor_fit, count_share
from frcnn.data.sample import Sample

__all__ = ["SMALL_MIN", "SMALL_SHARE", "scale_up", "scale_up_line", "small_boxes", "small_boxes_hint"]

SMALL_SHARE = 0.25  # a group speaks when at least this share of its boxes is under 2 strides ...
SMALL_MIN = 10  # ... and at least this many (a rare class's few tiny boxes do not ask for a larger input)


def small_boxes(fit: AnchorFit, classes: Sequence[str] = ()) -> dict | None:
    """When at least a quarter of the boxes, or of one class's boxes (``classes``: the names of labels 1..K), and
    at least ``SMALL_MIN`` of them, are smaller than twice the (finest) stride at the training scale: how many
    (``boxes``) of how many (``out_of``) in which group (``class``: None for all the boxes, else the class), and the
    input that brings that group's first quartile to two strides (``scale``, a multiple of 32, the same for training
    and test, with ``max_size`` grown alike) and its cost, about ``(scale / old) ** 2`` the time an iteration; else
    ``None``. Of several such groups, the one needing the largest input speaks."""
    if not fit.count:
        return None
    stride = min(fit.levels) if fit.levels else fit.stride
    limit = 2 * stride
    groups = [(None, fit.labels >= 0)]
    groups += [(name, fit.labels == k) for k, name in enumerate(classes, start=1)]
    found = None
    for name, mask in groups:
        sizes = fit.sizes[mask]
        small = int((sizes < limit).sum())
        if small < max(SMALL_SHARE * len(sizes), SMALL_MIN):
            continue
        quartile = max(float(sizes.quantile(SMALL_SHARE)), 1.0)
        scale = math.ceil(fit.target_size * limit / quartile / 32) * 32
        if found is None or scale > found["scale"]:
            found = {"class": name, "under_px": limit, "stride": stride, "boxes": small,
                     "share": round(small / len(sizes), 4), "scale": scale,
                     "max_size": _grown(fit.max_size, scale, fit.target_size),
                     "cost": round((scale / fit.target_size) ** 2, 2), "out_of": len(sizes)}
    return found


def _grown(size: int, new: int, old: int) -> int:
    """``size`` grown by ``new / old``, rounded up to a multiple of 32 (integers: no float rounding)."""
    return -(-size * new // (old * 32)) * 32


def _group(small: dict) -> str:
    return f"{small['class']} " if small["class"] is not None else ""


def small_boxes_hint(fit: AnchorFit, classes: Sequence[str] = ()) -> str | None:
    """:func:`small_boxes` as a warning line for the terminal, else ``None``."""
    if (small := small_boxes(fit, classes)) is None:
        return None
    limit, stride, scale, max_size = small["under_px"], small["stride"], small["scale"], small["max_size"]
    which, share = _group(small), count_share(small["boxes"], small["out_of"])
    return (f"  warning: {share} of the {which}boxes are under {limit} px (2 x the "
            f"stride {stride}) at scale {fit.target_size}: few anchors on a {stride}-px grid reach IoU "
            f"{fit.positive:g} with them; a larger input brings 3 in 4 {which}boxes to {limit} px or more, at "
            f"about {small['cost']:.1f}x the time an iteration: --set TRAIN.SCALES=[{scale}] "
            f"--set TRAIN.MAX_SIZE={max_size} --set TEST.SCALES=[{scale}] --set TEST.MAX_SIZE={max_size}")


def scale_up(cfg: Config, samples: Sequence[Sample], classes: Sequence[str] = ()) -> tuple[Config, dict | None]:
    """``cfg`` at the input :func:`small_boxes` asks for ``samples``, at most ``TRAIN.SCALE_UP_LIMIT`` times the time
    of an iteration (the largest multiple of 32 within it), and what was done (``from`` and ``to`` the short side,
    ``cost``, ``capped``, with :func:`small_boxes`'s dict); ``(cfg, None)`` when the limit is 0, no group is small or
    the limit leaves no room. ``TRAIN.SCALES``, ``TRAIN.MAX_SIZE``, ``TEST.SCALES`` and ``TEST.MAX_SIZE`` grow by the
    one factor ``to / from`` (each rounded up to a multiple of 32) and ``SCALE_UP_LIMIT`` becomes 0."""
    limit = cfg.TRAIN.SCALE_UP_LIMIT
    if limit <= 0:
        return cfg, None
    fit = anchor_fit(samples, cfg, scales=(1,))  # only the boxes' sizes at the training scale matter here
    if (small := small_boxes(fit, classes)) is None:
        return cfg, None
    old = fit.target_size
    new = min(small["scale"], math.floor(old * math.sqrt(limit) / 32) * 32)
    if new <= old:
        return cfg, None
    train = replace(cfg.TRAIN, SCALES=tuple(_grown(s, new, old) for s in cfg.TRAIN.SCALES),
                    MAX_SIZE=_grown(cfg.TRAIN.MAX_SIZE, new, old), SCALE_UP_LIMIT=0.0)
    test = replace(cfg.TEST, SCALES=tuple(_grown(s, new, old) for s in cfg.TEST.SCALES),
                   MAX_SIZE=_grown(cfg.TEST.MAX_SIZE, new, old))
    done = {**small, "from": old, "to": new, "limit": limit, "capped": new < small["scale"],
            "cost": round((new / old) ** 2, 2), "asked": small["scale"], "asked_cost": small["cost"]}
    del done["scale"], done["max_size"]
    return replace(cfg, TRAIN=train, TEST=test), done


def scale_up_line(cfg: Config, done: dict) -> str:
    """What :func:`scale_up` did (``cfg`` its config), one line for the terminal."""
    which = _group(done)
    capped = (f"; {done['asked']} would bring 3 in 4 to {done['under_px']} px, at {done['asked_cost']:.1f}x: raise "
              "TRAIN.SCALE_UP_LIMIT for it") if done["capped"] else ""
    return (f"input: TRAIN.SCALE_UP_LIMIT={done['limit']:g} -> TRAIN.SCALES={list(cfg.TRAIN.SCALES)} "
            f"MAX_SIZE={cfg.TRAIN.MAX_SIZE}, TEST.SCALES={list(cfg.TEST.SCALES)} MAX_SIZE={cfg.TEST.MAX_SIZE}, "
            f"about {done['cost']:.1f}x the time an iteration: {count_share(done['boxes'], done['out_of'])} of the "
            f"{which}boxes are under {done['under_px']} px (2 x the stride {done['stride']}) at scale "
            f"{done['from']}{capped} (TRAIN.SCALE_UP_LIMIT=0: keep the input)")
