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


def test_missed_objects_are_named_with_the_best_iou_found_there():
    s = confusion_summary(Scene(), _dets(), score_thresh=0.5)
    # the dog of image a: no dog detection overlaps it (the one of image b is another image); the difficult cat
    # and the matched cat are not missed
    # no dog detection at any score is near it either: never found
    assert s["missed_objects"] == [{"image": "a", "class": "dog", "box": [20.0, 20.0, 29.0, 29.0], "best_iou": 0.0,
                                    "found_below_threshold": False}]
    assert len(s["missed_objects"]) == s["totals"]["missed"] and s["totals"]["never_found"] == 1
    text = format_confusion(s)
    assert "a  dog  [20, 20, 29, 29]  best IoU 0.00  never found" in text and "never found: 1 (" in text
    dets = _dets()
    a = dets[0]
    near = torch.tensor([[22.0, 22, 31, 31], [20, 20, 29, 29]])  # a dog box 2 px off, and an exact one under 0.5
    dets[0] = Detections(torch.cat([a.boxes, near]), torch.cat([a.scores, torch.tensor([0.6, 0.4])]),
                         torch.cat([a.labels, torch.tensor([2, 2])]))
    s = confusion_summary(Scene(), dets, score_thresh=0.5)
    # +1 convention: 8 x 8 px shared of two 10 x 10 boxes: 64 / (100 + 100 - 64)
    assert s["missed_objects"][0]["best_iou"] == round(64 / 136, 4)
    # the exact box scored 0.4 matches it at any score: missed at 0.5, but found below it
    assert s["missed_objects"][0]["found_below_threshold"] is True and s["totals"]["never_found"] == 0
    text = format_confusion(s)
    assert "missed objects: 1" in text and "a  dog  [20, 20, 29, 29]  best IoU 0.47\n" in text
    assert "never found: none" in text
    s = confusion_summary(Scene(), dets, score_thresh=0.3)  # now the exact one counts: nothing missed
    assert s["missed_objects"] == [] and s["totals"]["missed"] == 0
    assert "missed objects" not in format_confusion(s)


def test_never_found_follows_the_greedy_matching_at_any_score():
    """A low-scored box on a missed object that a higher-scored box of the same class has already claimed is a
    duplicate, not a match: the object is never found (VOC's greedy matching, not "some box overlaps it")."""
    scene = Scene()
    scene.samples[0] = Sample("a", "a.png", 80, 80, torch.tensor([[0.0, 0, 9, 9], [2, 0, 11, 9]]),
                              torch.tensor([1, 1]), torch.tensor([False, False]))
    # the second cat overlaps the first by 8 x 10 px: IoU 80 / 120 = 0.667 between the two gt boxes
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 9]])  # two boxes on the first cat, one at 0.9, one at 0.2
    dets = [Detections(boxes, torch.tensor([0.9, 0.2]), torch.tensor([1, 1])), _dets()[1]]
    s = confusion_summary(scene, dets, score_thresh=0.5)
    # the box at 0.2 overlaps the first cat 1.0 and the second 80/120: its best gt is the first, already matched
    assert [m["box"] for m in s["missed_objects"]] == [[2.0, 0.0, 11.0, 9.0]]
    assert s["missed_objects"][0]["best_iou"] == round(80 / 120, 4)
    assert s["missed_objects"][0]["found_below_threshold"] is False and s["totals"]["never_found"] == 1
    dets[0] = Detections(torch.tensor([[0.0, 0, 9, 9], [2, 0, 11, 9]]), torch.tensor([0.9, 0.2]),
                         torch.tensor([1, 1]))  # now the low box sits on the second cat exactly
    s = confusion_summary(scene, dets, score_thresh=0.5)
    assert s["missed_objects"][0]["found_below_threshold"] is True and s["totals"]["never_found"] == 0
