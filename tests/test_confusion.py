"""Confusion summary: every detection's outcome on a hand-built scene."""

from __future__ import annotations

import pytest
import torch

from frcnn.data.sample import Sample
from frcnn.engine.confusion import confusion_summary, format_confusion
from frcnn.model.detector import Detections


class Scene:
    classes = ("cat", "dog")

    def __init__(self) -> None:
        self.samples = [
            Sample("a", "a.png", 80, 80, torch.tensor([[0.0, 0, 9, 9], [20, 20, 29, 29], [40, 40, 49, 49]]),
                   torch.tensor([1, 2, 1]), torch.tensor([False, False, True])),
            Sample("b", "b.png", 80, 80, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                   torch.zeros(0, dtype=torch.bool)),
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def _dets():
    a = [([0, 0, 9, 9], 0.9, 1),  # correct
         ([0, 0, 9, 9], 0.8, 1),  # duplicate
         ([20, 20, 29, 29], 0.7, 1),  # a dog called cat
         ([40, 40, 49, 49], 0.6, 1),  # the difficult cat: ignored
         ([2, 2, 13, 13], 0.56, 1),  # IoU 64/180 with the cat: localization
         ([60, 60, 69, 69], 0.55, 1),  # background
         ([0, 0, 9, 9], 0.3, 1),  # under the score threshold
         ([50, 0, 59, 9], 0.9, 2)]  # background
    b = [([5, 5, 30, 30], 0.95, 2)]  # an image without objects
    return [Detections(torch.tensor([d[0] for d in x], dtype=torch.float32), torch.tensor([d[1] for d in x]),
                       torch.tensor([d[2] for d in x])) for x in (a, b)]


def test_each_detection_has_one_outcome():
    s = confusion_summary(Scene(), _dets(), score_thresh=0.5)
    cat, dog = s["per_class"]["cat"], s["per_class"]["dog"]
    assert cat == {"detections": 6, "gt": 1, "missed": 0, "correct": 1, "duplicate": 1, "ignored": 1,
                   "confused": 1, "localization": 1, "background": 1, "confused_with": {"dog": 1}}
    assert dog == {"detections": 2, "gt": 1, "missed": 1, "correct": 0, "duplicate": 0, "ignored": 0,
                   "confused": 0, "localization": 0, "background": 2, "confused_with": {}}
    assert s["totals"]["background"] == 3 and s["totals"]["detections"] == 8
    assert s["matrix"] == {"rows": ["cat", "dog", "background"], "cols": ["cat", "dog"],
                           "counts": [[3, 0], [1, 0], [1, 2]]}
    text = format_confusion(s)
    assert "cat <- dog: 1" in text and text.count("\n") >= 5


def test_threshold_and_length_check():
    s = confusion_summary(Scene(), _dets(), score_thresh=0.0)
    assert s["per_class"]["cat"]["detections"] == 7 and s["per_class"]["cat"]["duplicate"] == 2
    with pytest.raises(ValueError):
        confusion_summary(Scene(), _dets()[:1])
