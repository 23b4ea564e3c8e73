"""Room at test time for images with many objects: proposals and detections an image from the training set.

The test-time counts of a preset (scratch-cpu: 100 proposals, 100 detections an image) cap recall on busy images: an
image of 120 objects can find at most 100 of them. With ``TEST.PROPOSALS_PER_OBJECT`` ``k`` above 0 (scratch-cpu: 4)
``frcnn train`` raises, from the training set's busy images (``m`` boxes an image, the 90th percentile by nearest
rank: one crowded outlier does not set the counts of every image), ``TEST.RPN_POST_NMS_TOP_N`` to at least ``k x m``,
``TEST.MAX_PER_IMAGE`` to at least half that, and ``TEST.RPN_PRE_NMS_TOP_N`` to at least twice the proposals kept;
the run's config.yaml holds the counts (``PROPOSALS_PER_OBJECT: 0``: resolved once). Counts are never lowered.

Measured (``benchmarks/results/scratch_cpu.md``, checkpoints scored again): BCCD tiled 3 x 3 (121 boxes an image, 90th
percentile 141), a 448-px checkpoint 0.6151 with 100 proposals and detections, 0.7675 with 200 proposals, 0.790 with
300, 0.8117 with 600 or 1000 (recall saturates near 4 proposals an object), 0.8275 with the 564 / 282 resolved; tiled
2 x 2 (90th percentile 65: 260 / 130) 0.7588 -> 0.7995 at 320. BCCD (19: 76, under the preset's 100) and the demo's
data (5) are unchanged: more proposals than needed cost BCCD 0.03-0.11 points (120 on seeds 0-2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from frcnn.config import Config
from frcnn.data.sample import Sample

__all__ = ["room_for_objects", "room_line"]


def room_for_objects(cfg: Config, samples: Sequence[Sample]) -> tuple[Config, dict | None]:
    """``cfg`` with the test-time counts raised for ``samples``' busy images (see the module), and what changed
    (``objects``: the 90th percentile of boxes an image, ``from``/``to``: the three counts); ``(cfg, None)`` when
    off or nothing grows."""
    per_object = cfg.TEST.PROPOSALS_PER_OBJECT
    if per_object <= 0 or not samples:
        return cfg, None
    test = cfg.TEST
    boxes = sorted(len(s.boxes) for s in samples)
    busy = boxes[math.ceil(0.9 * len(boxes)) - 1]  # the 90th percentile, nearest rank
    post = max(test.RPN_POST_NMS_TOP_N, math.ceil(per_object * busy))
    counts = {"RPN_PRE_NMS_TOP_N": max(test.RPN_PRE_NMS_TOP_N, 2 * post), "RPN_POST_NMS_TOP_N": post,
              "MAX_PER_IMAGE": max(test.MAX_PER_IMAGE, math.ceil(post / 2))}
    before = {key: getattr(test, key) for key in counts}
    if counts == before:
        return cfg, None
    return (replace(cfg, TEST=replace(test, **counts, PROPOSALS_PER_OBJECT=0.0)),
            {"objects": busy, "per_object": per_object, "from": before, "to": counts})


def room_line(done: dict) -> str:
    """What :func:`room_for_objects` did, one line for the terminal."""
    changes = ", ".join(f"{key} {done['from'][key]} -> {value}" for key, value in done["to"].items()
                        if value != done["from"][key])
    return (f"test: TEST.PROPOSALS_PER_OBJECT={done['per_object']:g} -> {changes} (9 in 10 training images have "
            f"{done['objects']} boxes or fewer; TEST.PROPOSALS_PER_OBJECT=0: keep the counts)")
