"""The whole detector learns: it overfits four tiny images and then finds their objects."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image, ImageDraw

from frcnn.boxes import box_iou
from frcnn.config import load_config
from frcnn.data.sample import Sample
from frcnn.engine.inference import Predictor
from frcnn.engine.train import train

# (class, x1, y1, x2, y2) per image; class 1 = filled square, class 2 = filled circle
OBJECTS = [
    [(1, 20, 24, 71, 75), (2, 88, 80, 139, 131)],
    [(2, 12, 70, 75, 133)],
    [(1, 64, 16, 127, 79), (2, 10, 10, 49, 49)],
    [(1, 30, 60, 101, 131)],
]


class TinySet:
    classes = ("square", "circle")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images, self.samples = [], []
        for i, objs in enumerate(OBJECTS):
            noise = (torch.rand(160, 160, 3, generator=g) * 60 + 90).to(torch.uint8).numpy()
            im = Image.fromarray(noise)
            draw = ImageDraw.Draw(im)
            for cls, x1, y1, x2, y2 in objs:
                colour = (200, 40, 40) if i % 2 else (40, 40, 200)
                (draw.rectangle if cls == 1 else draw.ellipse)((x1, y1, x2, y2), fill=colour)
            self.images.append(im)
            boxes = torch.tensor([o[1:] for o in objs], dtype=torch.float32)
            self.samples.append(Sample(f"img{i}", f"img{i}.png", 160, 160, boxes,
                                       torch.tensor([o[0] for o in objs]), torch.zeros(len(objs), dtype=torch.bool)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def load_image(self, sample: Sample) -> Image.Image:
        return self.images[int(sample.image_id[3:])]


# demo-cpu on the tiny set, trained to an optimum rather than to wherever the stochastic path happens to be:
# 200 iterations of the whole set (4 images a batch; 100 epochs of the 8 plain and mirrored images), the rate cut
# tenfold for the last fifth. Four images a batch also make the tiny backbone's BatchNorm normalise in training
# with nearly the statistics it keeps for inference: with one image a batch (demo-cpu's) the red and the blue
# images are each normalised by their own mean in training but by the average at inference, and the boxes
# come out loose (best IoU 0.48-0.93 instead of 0.96-0.99 over seeds), by an amount that depends on the seed.
OVERFIT = [
    "TRAIN.SCALES=[160]", "TEST.SCALES=[160]", "TRAIN.IMS_PER_BATCH=4", "TRAIN.MAX_ITERS=200", "TRAIN.STEPSIZE=[160]",
    "TRAIN.WARMUP_ITERS=10", "TRAIN.SNAPSHOT_ITERS=200", "TRAIN.DISPLAY=10", "TRAIN.LEARNING_RATE=0.02",
    "TRAIN.BATCH_SIZE=64", "DEVICE=cpu",
]
NEAR = 0.3  # a detection overlapping an object by more than this IoU is about that object


@dataclass
class Verdict:
    """What the detections say about one object: its best-scoring nearby detection (class, IoU, score), the
    best score of any *other* detection near it (of any class), and of one of another class."""

    image_id: str
    label: int
    best_label: int  # 0: no detection near the object
    best_iou: float
    best_score: float
    runner_up: float
    other_class: float


def verdicts(sample: Sample, det) -> tuple[list[Verdict], float]:
    """One :class:`Verdict` per object, and the best score of a detection near no object at all."""
    iou = box_iou(sample.boxes, det.boxes)  # (objects, detections)
    out = []
    for j, label in enumerate(sample.labels.tolist()):
        near = iou[j] > NEAR
        scores = torch.where(near, det.scores, torch.full_like(det.scores, -1.0))
        best = int(scores.argmax()) if near.any() else None
        others = near.clone()
        if best is not None:
            others[best] = False
        out.append(Verdict(
            sample.image_id, label, 0 if best is None else int(det.labels[best]),
            0.0 if best is None else float(iou[j, best]), 0.0 if best is None else float(det.scores[best]),
            float(det.scores[others].max()) if others.any() else 0.0,
            float(det.scores[near & (det.labels != label)].max()) if (near & (det.labels != label)).any() else 0.0))
    away = (iou <= NEAR).all(0)
    return out, float(det.scores[away].max()) if away.any() else 0.0


@pytest.mark.slow
def test_detector_overfits_a_tiny_set(tmp_path):
    """Trained to an optimum, the detector finds every object with the right class and a tight box, and nothing
    else comes close. The bounds sit far from what training reaches with RNG_SEED 0-3 and 1 or 2 threads (best
    IoU at least 0.93, its score at least 0.998, anything else near an object at most 0.08, nothing away from
    them above 0.0001, loss down at least 35-fold), so float rounding cannot decide the verdict. A detector that
    confuses classes, misplaces boxes or does not learn fails it: decoding that ignored the regression deltas
    would leave anchor boxes (best IoU 0.64-0.75 on four of the six objects), deltas with the wrong sign put
    confident boxes away from the objects."""
    cfg = load_config("demo-cpu", OVERFIT)
    data = TinySet()
    model = train(cfg, data, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["total"] < 0.1 * log[0]["total"], log  # the last 10 iterations against the first 10
    predictor = Predictor(model, cfg, data.classes)
    for sample, image in zip(data.samples, data.images):
        det = predictor.predict([image])[0]
        objects, elsewhere = verdicts(sample, det)
        for v in objects:
            # every object is found: its best-scoring detection has its class, a tight box and a high score ...
            assert (v.best_label, v.best_iou > 0.8, v.best_score > 0.9) == (v.label, True, True), (v, det)
            # ... and no other detection on it, of its class or another, is confident
            assert v.runner_up < 0.5, (v, det)
        # nothing is reported with any confidence away from the objects
        assert elsewhere < 0.5, (sample.image_id, elsewhere, det)
